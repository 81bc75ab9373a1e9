"""Data: document sources, SentencePiece tokenizer, preparation to token shards, Grain loader, report."""
