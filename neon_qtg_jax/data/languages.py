"""Per-language quality rules for the `web` preset (data.filters=web, data.languages).

English (`en`) keeps FineWeb's rules: datatrove's Gopher, C4 and FineWeb quality filters with their
defaults, as `web_en` runs them. Every other language here carries over FineWeb-2's published
figures for it (the `configs/<lang>_<script>.yml` files of the FineWeb-2 repository, Apache-2.0,
used as its `fineweb-2-pipeline.py` uses them): Gopher repetition with the language's duplicated-line
fraction and n-gram fractions (paragraph and character fractions off), FineWeb quality with the
language's line-punctuation and newline ratios (short-line rule off, character-duplicate ratio 0.1),
Gopher quality with the language's mean word length bounds, alphabetic-word ratio and stop words
(at least 2 of them). FineWeb-2 does not run the C4 filter on other languages, and neither does
`web`. FineWeb-2's language score is GlotLID's; the `language` step here runs fastText lid.176,
whose scores are on another scale, so it keeps data.language_threshold (FineWeb's 0.65) for every
language instead (`glotlid_score` is kept for reference).

Languages are fastText lid.176 codes (ISO 639-1). Words: letter/digit runs and punctuation runs
(filter_steps.py), which fits these languages, all written with spaces between words; languages
without them (Chinese, Japanese, Thai) need a segmenter and are not here.
"""

from __future__ import annotations

import dataclasses

from neon_qtg_jax import config

ENGLISH = "en"


@dataclasses.dataclass(frozen=True)
class LanguageRules:
  """FineWeb-2's figures for one language."""
  fineweb2: str                                  # FineWeb-2's name: ISO 639-3 and script
  dup_line_frac: float
  top_n_grams: tuple[tuple[int, float], ...]
  dup_n_grams: tuple[tuple[int, float], ...]
  line_punct_thr: float
  new_line_ratio: float
  min_avg_word_length: float
  max_avg_word_length: float
  max_non_alpha_words_ratio: float
  glotlid_score: float
  stop_words: tuple[str, ...]


RULES: dict[str, LanguageRules] = {
    "cs": LanguageRules("ces_Latn", dup_line_frac=0.311, top_n_grams=((2, 0.206), (3, 0.183), (4, 0.165)),
                        dup_n_grams=((5, 0.168), (6, 0.157), (7, 0.145), (8, 0.133), (9, 0.121), (10, 0.109)),
                        line_punct_thr=0.06, new_line_ratio=0.182, min_avg_word_length=3, max_avg_word_length=11,
                        max_non_alpha_words_ratio=0.781, glotlid_score=0.88,
                        stop_words=tuple("v a se na je z s do".split())),
    "de": LanguageRules("deu_Latn", dup_line_frac=0.263, top_n_grams=((2, 0.169), (3, 0.153), (4, 0.137)),
                        dup_n_grams=((5, 0.141), (6, 0.134), (7, 0.126), (8, 0.117), (9, 0.108), (10, 0.098)),
                        line_punct_thr=0.0, new_line_ratio=0.152, min_avg_word_length=0, max_avg_word_length=15,
                        max_non_alpha_words_ratio=0.774, glotlid_score=0.821,
                        stop_words=tuple("der und die in von im den des mit das er dem als wurde für".split())),
    "es": LanguageRules("spa_Latn", dup_line_frac=0.252, top_n_grams=((2, 0.156), (3, 0.14), (4, 0.125)),
                        dup_n_grams=((5, 0.145), (6, 0.136), (7, 0.127), (8, 0.117), (9, 0.108), (10, 0.099)),
                        line_punct_thr=0.182, new_line_ratio=0.138, min_avg_word_length=3, max_avg_word_length=14,
                        max_non_alpha_words_ratio=0.825, glotlid_score=0.84,
                        stop_words=tuple("de la en el y a que del los se por un con una las su".split())),
    "fr": LanguageRules("fra_Latn", dup_line_frac=0.264, top_n_grams=((2, 0.161), (3, 0.149), (4, 0.134)),
                        dup_n_grams=((5, 0.15), (6, 0.141), (7, 0.131), (8, 0.121), (9, 0.111), (10, 0.1)),
                        line_punct_thr=0.1, new_line_ratio=0.185, min_avg_word_length=2, max_avg_word_length=11,
                        max_non_alpha_words_ratio=0.812, glotlid_score=0.824,
                        stop_words=tuple("de la le et à en l' des du les est d' un une il dans par au".split())),
    "it": LanguageRules("ita_Latn", dup_line_frac=0.246, top_n_grams=((2, 0.198), (3, 0.156), (4, 0.133)),
                        dup_n_grams=((5, 0.144), (6, 0.136), (7, 0.127), (8, 0.118), (9, 0.109), (10, 0.1)),
                        line_punct_thr=0.025, new_line_ratio=0.2, min_avg_word_length=3, max_avg_word_length=21,
                        max_non_alpha_words_ratio=0.807, glotlid_score=0.817,
                        stop_words=tuple("di e il la in a del che è della un per nel l' con da i una".split())),
    "nl": LanguageRules("nld_Latn", dup_line_frac=0.296, top_n_grams=((2, 0.213), (3, 0.182), (4, 0.158)),
                        dup_n_grams=((5, 0.156), (6, 0.146), (7, 0.136), (8, 0.126), (9, 0.115), (10, 0.104)),
                        line_punct_thr=0.102, new_line_ratio=0.154, min_avg_word_length=3, max_avg_word_length=17,
                        max_non_alpha_words_ratio=0.828, glotlid_score=0.689,
                        stop_words=tuple("de van in het een en is op voor met door zijn werd hij uit".split())),
    "pl": LanguageRules("pol_Latn", dup_line_frac=0.32, top_n_grams=((2, 0.222), (3, 0.198), (4, 0.176)),
                        dup_n_grams=((5, 0.172), (6, 0.16), (7, 0.148), (8, 0.136), (9, 0.123), (10, 0.111)),
                        line_punct_thr=0.087, new_line_ratio=0.158, min_avg_word_length=3, max_avg_word_length=12,
                        max_non_alpha_words_ratio=0.726, glotlid_score=0.689,
                        stop_words=tuple("w i na z do się roku od a jest przez po jako oraz o został był nie".split())),
    "pt": LanguageRules("por_Latn", dup_line_frac=0.287, top_n_grams=((2, 0.371), (3, 0.191), (4, 0.163)),
                        dup_n_grams=((5, 0.163), (6, 0.153), (7, 0.141), (8, 0.13), (9, 0.119), (10, 0.108)),
                        line_punct_thr=0.077, new_line_ratio=0.186, min_avg_word_length=3, max_avg_word_length=13,
                        max_non_alpha_words_ratio=0.814, glotlid_score=0.799,
                        stop_words=tuple("de a e o em do da que um no uma com para na é foi".split())),
    "ru": LanguageRules("rus_Cyrl", dup_line_frac=0.322, top_n_grams=((2, 0.184), (3, 0.164), (4, 0.146)),
                        dup_n_grams=((5, 0.168), (6, 0.156), (7, 0.145), (8, 0.133), (9, 0.121), (10, 0.109)),
                        line_punct_thr=0.231, new_line_ratio=0.139, min_avg_word_length=3, max_avg_word_length=11,
                        max_non_alpha_words_ratio=0.713, glotlid_score=0.9,
                        stop_words=tuple("в и на с года по году из был к не от что за для его как а он также до после".split())),
    "sv": LanguageRules("swe_Latn", dup_line_frac=0.292, top_n_grams=((2, 0.242), (3, 0.195), (4, 0.174)),
                        dup_n_grams=((5, 0.156), (6, 0.147), (7, 0.136), (8, 0.125), (9, 0.116), (10, 0.105)),
                        line_punct_thr=0.2, new_line_ratio=0.135, min_avg_word_length=3, max_avg_word_length=12,
                        max_non_alpha_words_ratio=0.841, glotlid_score=0.629,
                        stop_words=tuple("i och är av en som den med på till att för".split())),
    "tr": LanguageRules("tur_Latn", dup_line_frac=0.272, top_n_grams=((2, 0.214), (3, 0.168), (4, 0.147)),
                        dup_n_grams=((5, 0.154), (6, 0.144), (7, 0.134), (8, 0.124), (9, 0.113), (10, 0.103)),
                        line_punct_thr=0.091, new_line_ratio=0.222, min_avg_word_length=3, max_avg_word_length=21,
                        max_non_alpha_words_ratio=0.773, glotlid_score=0.875,
                        stop_words=tuple("ve bir olarak bu ile için olan da de tarafından yılında sonra en daha ilk the".split())),
    "uk": LanguageRules("ukr_Cyrl", dup_line_frac=0.3, top_n_grams=((2, 0.189), (3, 0.172), (4, 0.153)),
                        dup_n_grams=((5, 0.16), (6, 0.148), (7, 0.136), (8, 0.124), (9, 0.113), (10, 0.102)),
                        line_punct_thr=0.167, new_line_ratio=0.175, min_avg_word_length=3, max_avg_word_length=11,
                        max_non_alpha_words_ratio=0.694, glotlid_score=0.9,
                        stop_words=tuple("у в на і з та до року за що".split())),
}

# Languages the `web` preset has rules for: English (FineWeb's) and FineWeb-2's above.
LANGUAGES: tuple[str, ...] = (ENGLISH,) + tuple(sorted(RULES))
config.register_choices("data.languages", lambda: LANGUAGES)  # validate() names them


