"""QTG (its defaults and the spec's form) against a standard-shape GPT and the spec's GPT switches, at equal
training FLOPs on two corpora and at equal wall time; each variant's learning rate chosen from LR_GRID on
the standard library's tuning split and used in every group.

  python tools/study.py --study=studies/qtg_vs_gpt.py --out=runs/study --list     # runs and CPU time
  python tools/study.py --study=studies/qtg_vs_gpt.py --out=runs/study --publish=docs/RESULTS.md

The recall table comes from docs/results/recall (the tools/recall.py results, one JSON per run):
  for v in qtg qtg_seed gpt; do for s in 0 1 2; do python tools/recall.py --variant=$v --task=mqar \
      --preset=small --seed=$s --output=docs/results/recall/mqar_small_${v}_seed$s.json; done; done
and likewise for --task=lookup and --task=induction (presets small, hard) and --preset=medium, hard.

The second corpus is English prose from the Debian package `fortunes` (`apt-get install fortunes`):
the fortune databases in /usr/share/games/fortunes (quotations, jokes, poems, literature), one
document per fortune (records between "%" lines, `data.text_split=percent_line`), the
technical and ASCII-art files left out. `--list` prints the CPU time it needs.
"""

import glob
import os

FORTUNE_DIR = "/usr/share/games/fortunes"
# Files of the fortunes package that are code, ASCII pictures or operating-system tips, not prose.
NOT_PROSE = ("ascii-art", "computers", "debian", "linux", "linuxcookie", "perl", "startrek", "zippy")

from neon_qtg_jax.model.variants import GPT, GPT_SPEC, QTG_SEED  # noqa: E402

# Equal training FLOPs: every tiny run gets the FLOPs of REFERENCE_STEPS steps of the standard GPT, the
# variant with the most FLOPs per token, so every run trains at least that many steps.
REFERENCE_STEPS = 1000
WALL_MINUTES = 8.0    # the equal-wall-time group: minutes of training per run, at most WALL_MAX_STEPS steps
WALL_MAX_STEPS = 3000
# Every variant's training.lr comes from this grid: one tuning run per value (seed 100, the first group's
# budget), scored on the standard library's tuning split (data.tune_fraction), never on a validation
# split; the other groups take each variant's rate from there (lr_from): tuning every group would
# cost 21 more runs, about 7 CPU hours.
LR_GRID = [1e-3, 3e-3, 1e-2]
VARIANTS = [
    {"name": "gpt", "label": "standard GPT (attention 2d wide, FFN 8d, tied embeddings)", "overrides": GPT},
    {"name": "gpt_spec", "label": "the spec's GPT switches (attention d wide, FFN 4d, untied)",
     "overrides": GPT_SPEC},
    {"name": "qtg", "label": "QTG (defaults)", "overrides": {}},
    {"name": "qtg_seed", "label": "QTG, the spec's form (W_psi normal(0.02), sphere map of q as projected)",
     "overrides": QTG_SEED},
    # The geometry's controls (issue 27): the same QTG block with the default score's second-order expansion
    # (cosine) and with plain dot-product scores. Tier 4: they run after the groups above are complete.
    {"name": "qtg_cosine", "label": "QTG with the cosine kind (the default score to second order)",
     "overrides": {"model.attention": "cosine"}, "tier": 4},
    {"name": "qtg_dot", "label": "QTG with dot-product scores in the same block", "overrides": {"model.attention": "dot"},
     "tier": 4},
]

# Written on 2026-12-06, before any sweep cell or language run with qtg_cosine exists; report.py applies it.
DECISION_RULE = {
    "question": "Does the Fisher-Rao geometry add anything? `qtg` against its second-order twin `qtg_cosine`",
    "written": "2026-12-06",
    "arms": ("qtg", "qtg_cosine"),
    "language_groups": ("tiny_stdlib", "tiny_fortunes"),
    "seeds": (0, 1, 2),
    "text": (
        "`qtg_cosine` is `qtg` with the score replaced by its exact second-order expansion, -(gamma/4) Var_d(a - b) "
        "(docs/MODEL.md); everything else in the block is the same, so the two differ only in what the exact "
        "geometry adds beyond second order. The geometry **adds value** if (a) on the MQAR sweep `qtg` solves "
        "(held-out accuracy >= 0.99 on every one of 3 seeds, every smaller level solved too) at least one more "
        "pairs level than `qtg_cosine` in at least 2 of the 2 widths, counting only levels that `gpt_spec` solves "
        "on every seed (a level dot attention does not solve says nothing about either), or (b) on language "
        "`qtg` has lower validation bits per byte than `qtg_cosine` with a Welch 95% interval that excludes 0 in "
        "both equal-FLOPs groups (standard library and fortunes, 3 seeds each). It **costs value** if the same "
        "holds with the two exchanged. Otherwise it **adds nothing measurable** at these shapes. Learning rates "
        "come from the tuning rows (MQAR) and the tuning split (language), never from what the rule reads."),
}


# Measured after the rule was applied to the runs (2026-12-06); the rule above stays as written.
VERDICT_NOTE = (
    "**Data preparation.** The rule's language contrast compares runs on one preparation of each corpus: "
    "`qtg`, `qtg_cosine`, `qtg_dot` and `gpt_spec` (equal FLOPs) were trained on 2026-12-06 on this machine's, "
    "3 seeds per corpus, and so was the wall-time `gpt_spec`. The runs of `gpt` and `qtg_seed`, and the wall-time "
    "`gpt`, `qtg` and `qtg_seed`, are those of 2026-11-30, reused from the published record because their "
    "configs are equal; that preparation differs slightly (its tokenizer: 252,730 standard-library validation "
    "tokens against 251,986), and `qtg` scored 1.7624 ± 0.0110 and 2.2780 ± 0.0041 bits/byte there against "
    "1.7482 ± 0.0024 and 2.2737 ± 0.0044 here. So a contrast between runs of the two dates (`qtg_seed` against "
    "`qtg`, anything against `gpt`, the wall-time `qtg` against `gpt_spec`) carries a bias of up to about 0.014 "
    "bits/byte; the section \"Published records reused without a data check\" lists those runs. `qtg` minus "
    "`gpt_spec`, published on 2026-11-30 as +0.0051 and +0.0076, is +0.0008 and +0.0006 on one preparation (no "
    "measurable difference either way). `qtg`'s and `gpt_spec`'s learning rates were chosen on the 2026-11-30 "
    "tuning split (`qtg`: 1.7500, 1.6722, 1.7174 bits/byte at 1e-3, 3e-3, 1e-2), the twins' on this one; the "
    "margins there are larger than the preparations' difference.")


def fortune_files() -> str:
  """The prose files of the fortunes package, comma-separated; the directory itself when absent,
  so that preparation fails naming it."""
  # Plain files only: other fortune packages install directories here (fortunes-ru adds ru/), and the
  # study's corpus must not depend on which of them a machine has.
  files = [path for path in sorted(glob.glob(os.path.join(FORTUNE_DIR, "*")))
           if os.path.isfile(path) and not path.endswith((".dat", ".u8")) and not os.path.islink(path)
           and os.path.basename(path) not in NOT_PROSE]
  return ",".join(files) or FORTUNE_DIR


def _variants(tier: int, seeds: int = 3, names: tuple[str, ...] = ()) -> list[dict]:
  """The variants of a group (`names`: only these; default: all but the tier-4 controls' own tier is kept)."""
  return [v | {"seeds": seeds, "tier": max(tier, v.get("tier", tier))} for v in VARIANTS
          if not names or v["name"] in names]


def get_study():
  flops_budget = {"kind": "flops", "steps": REFERENCE_STEPS, "reference": "gpt"}
  fortunes = {"data.source": "text", "data.paths": fortune_files(), "data.text_split": "percent_line",
              "data.data_dir": "data/fortunes", "data.val_fraction": 0.05, "data.tune_fraction": 0.0}
  return {
      "name": "qtg_vs_gpt",
      "title": "QTG against a standard GPT at equal training FLOPs and equal wall time",
      "description": (
          "Tiny shape: d=64 (residual width 128), 4 layers, 4 heads, windows of 128 tokens, batch 16, "
          "vocabulary 2048, AdamW with 50 warmup steps and cosine decay to 0 over each run's own step count, "
          f"its learning rate chosen per variant from {LR_GRID} on a tuning split of the standard library (2% of "
          "its documents, carved out of train by the document hash and never scored in the tables) and used "
          "unchanged in the fortunes and wall-time groups. Variants (neon_qtg_jax/model/variants.py): `gpt` is a standard-shape "
          "pre-norm GPT (nanoGPT's shape: Q, K, V and W_O as wide as the 128-wide residual, FFN hidden 512 = 4x "
          "the residual, token embedding tied to the output head); `gpt_spec` is the spec's baseline switches "
          "(the same code with dot-product attention, no TopoFilter, no W_psi, no unit-norm embedding, lambdas "
          "0: Q, K, V 64 wide, FFN hidden 256, untied); `qtg` is QTG with the project's defaults; `qtg_seed` "
          "is QTG in the spec's form (W_psi initialised normal(0.02) like every other matrix, the sphere map "
          "applied to q and k as projected). Equal FLOPs: every variant gets the training FLOPs of "
          f"{REFERENCE_STEPS} steps of `gpt` (model FLOPs per token from `--mode=info`). Second corpus: the "
          "English prose of the Debian package `fortunes` (`apt-get install fortunes`), one document per "
          "fortune (records between `%` lines, `data.text_split=percent_line`) from the 35 files of "
          "/usr/share/games/fortunes that are not code, ASCII art or OS tips."),
      "base_config": "configs/neon_qtg_tiny.py",
      "lr_grid": LR_GRID,
      "recall_dir": "docs/results/recall",
      "recall_sweep_dir": "docs/results/recall_sweep",
      "recall_gate_dir": "docs/results/recall_gate",
      "recall_tune_dir": "docs/results/recall_tune",
      "recall_note": (
          "**This table does not measure recall** (found 2026-12-06, issue 27); it is kept as it was made, with "
          "the task definitions of its time, and the MQAR sweep above replaces it. MQAR drew its values with "
          "replacement, so predicting the most frequent value in the context scores without any recall: 0.293 "
          "on `small`, 0.173 on `medium` (stated chance 0.25 and 0.125). Every failed run sits on that floor: "
          "medium's 0.17 means that no variant recalled anything, and `qtg`'s 0.289/0.294 and `qtg_seed`'s 0.28 "
          "are no recall. `lookup` showed the answers, so eliminating answered values scores 0.42-0.48 without "
          "any key matching: `qtg_seed`'s 0.41-0.46 is that. Induction's 0.95 bar is above what the task allows a "
          "one-token induction head (0.74 on rows of this shape) and near a two-token head (0.91): `gpt`'s 0.887 is "
          "not a failure. `gpt_spec` has one seed here. tools/recall.py now generates MQAR as Zoology does "
          "(disjoint key and value vocabularies, values distinct within a row), lookup with the answers hidden, "
          "and reports each task's measured `no_recall_floor` (and the induction heads) beside chance."),
      "decision_rule": DECISION_RULE,
      "verdict_note": VERDICT_NOTE,
      "overrides": {
          # A tuning split needs a prepared directory of its own (the fraction is in its fingerprint).
          "data.tune_fraction": 0.02, "data.data_dir": "data/stdlib_tune02",
          "training.max_train_minutes": 0.0, "training.warmup_steps": 50, "training.keep_checkpoints": 1,
          "training.save_interval_minutes": 5.0, "training.sample_steps": 1_000_000, "training.log_steps": 25,
          "eval.stride": 128,
      },
      "baseline": "gpt",
      "headline": "qtg",
      # qtg against gpt_spec isolates the Fisher-Rao attention; qtg_seed against qtg measures the remedies.
      "contrasts": [("qtg", "qtg_cosine"), ("qtg", "gpt_spec"), ("qtg", "qtg_dot"), ("qtg_seed", "qtg")],
      "pictures": [("tiny_stdlib", "gpt"), ("tiny_stdlib", "qtg"), ("tiny_stdlib", "qtg_seed")],
      "groups": [
          {"name": "tiny_stdlib", "title": "Tiny shape, Python standard library corpus, equal FLOPs",
           "budget": flops_budget, "overrides": {}, "variants": _variants(tier=1)},
          {"name": "tiny_fortunes", "title": "Tiny shape, English prose (Debian package fortunes), equal FLOPs",
           "budget": flops_budget, "overrides": fortunes, "lr_from": "tiny_stdlib", "variants": _variants(tier=2)},
          {"name": "tiny_stdlib_wall", "title": "Tiny shape, Python standard library corpus, equal wall time",
           "budget": {"kind": "wall_time", "minutes": WALL_MINUTES, "max_steps": WALL_MAX_STEPS}, "overrides": {},
           "lr_from": "tiny_stdlib", "variants": _variants(tier=3, names=("gpt", "qtg", "qtg_seed"))
           + _variants(tier=4, names=("gpt_spec",))},
      ],
      "notes": [
          "What isolates the Fisher-Rao attention is `qtg` against `gpt_spec`: the same widths, embedding and "
          "steps with dot-product attention in its place (and no TopoFilter, W_psi or auxiliary losses); the main "
          "result gives it second. The intervals in the group tables are against `gpt`, the standard shape, which "
          "spends more FLOPs per token and so trains fewer steps at equal FLOPs; a win over `gpt` that `gpt_spec` "
          "shares is not QTG's.",
          "The earlier study (commit 95808e2: 80-137 steps per run at the tiny config's learning rate) found "
          "QTG's Fisher-Rao attention almost exactly uniform over the prefix, with gamma within 0.05 of its "
          "initial value. docs/MODEL.md (\"Why the Fisher-Rao attention stayed uniform\") gives the cause "
          "measured at initialisation (W_psi's normal(0.02) shrinks the attention's inputs, so the scores start "
          "at about 1e-3 and their gradients at about 1e-6) and the remedies; `qtg_seed` keeps the spec's form "
          "so the report can show what they change.",
          "Runs of 1,000-1,800 steps (2-3.7M tokens) on 2 CPU cores: more than the earlier study's 80-137 steps, "
          "still far from converged models; a ranking can change with longer training or larger shapes.",
          "Equal FLOPs counts model FLOPs (`--mode=info`). Equal wall time is measured on a 2-core machine "
          "shared with other jobs: a run's steps depend on the load while it ran, and its learning-rate "
          "schedule spans the step cap, so a run the clock stops ends before its schedule does.",
          "At equal wall time `gpt` and `qtg` stopped at the same step in every seed (851, 876, 851), one step "
          "after a log step: on this CPU the host queues steps ahead of the computation and waits for it at "
          "each log step (every 25 steps, about 14 s), so the clock's stop comes in 25-step increments, coarser "
          "than the few percent by which their step times differ at the tiny shape. Between them that group is "
          "in effect an equal-steps comparison. The last run (`qtg_seed` seed 2) had the machine to itself for "
          "part of its 8 minutes and reached 1001 steps.",
          "`gpt_spec`'s equal-wall-time runs were made on 2026-12-06, the group's other runs on 2026-11-30: "
          "different days, code and machine load. `gpt_spec` reached 1121-1201 steps in its 8 minutes (each run "
          "beside one other training process), the others 851-1001; read that row as a different measurement, "
          "not as a wall-time ranking.",
          "Seeds change the initialisation and the data order together; 3 seeds give wide intervals, and an "
          "interval that excludes 0 at 3 seeds is still a weak result.",
          "The learning rate is chosen per variant from the same grid on the standard library's tuning split (one "
          "tuning run per value, seed 100, the equal-FLOPs budget) and reused for the prose corpus and the "
          "wall-time group, where it was not tuned: a variant whose best rate differs there is at a disadvantage. "
          "Warmup, batch and the other hyperparameters are the tiny config's, not tuned.",
          "The prose corpus is small (about 2 MB of fortunes); its validation split is 5% of its documents.",
          "Train times per run were measured on a 2-core machine shared with other jobs; they are not a "
          "benchmark (tools/bench_train.py measures step-time ratios in one process).",
          "Not shown: converged or large-scale behaviour, and anything about the 7b-100b configs.",
      ],
  }
