"""QTG against a standard GPT at equal training FLOPs: seeds, ablations, a larger shape, a second corpus,
an equal-wall-time group; each variant's learning rate chosen from LR_GRID on a tuning split.

  python tools/study.py --study=studies/qtg_vs_gpt.py --out=runs/study --list     # runs and CPU time
  python tools/study.py --study=studies/qtg_vs_gpt.py --out=runs/study --publish=docs/RESULTS.md \
      --recall_dir=runs/recall                                                   # tools/recall.py results

The second corpus is English prose from the Debian package `fortunes` (`apt-get install fortunes`):
the fortune databases in /usr/share/games/fortunes (quotations, jokes, poems, literature), one
document per fortune (records between "%" lines, `data.text_split=percent_line`), the
technical and ASCII-art files left out. Sized for about 1.5 hours of one CPU core.
"""

import glob
import os

FORTUNE_DIR = "/usr/share/games/fortunes"
# Files of the fortunes package that are code, ASCII pictures or operating-system tips, not prose.
NOT_PROSE = ("ascii-art", "computers", "debian", "linux", "linuxcookie", "perl", "startrek", "zippy")

GPT = {"model.attention": "dot", "model.topofilter": False, "model.w_psi": False,
       "model.amplitude_embedding": False, "training.lambda_topo": 0.0, "training.lambda_geo": 0.0,
       "training.lambda_quantum": 0.0}
DOT_BASELINE = {"model.attention": "dot", "model.topofilter": False, "training.lambda_topo": 0.0,
                "training.lambda_geo": 0.0, "training.lambda_quantum": 0.0}
NO_REGULARIZERS = {"training.lambda_topo": 0.0, "training.lambda_geo": 0.0, "training.lambda_quantum": 0.0}

TINY_STEPS = 120    # the FLOPs budget of a tiny run: 120 QTG steps of 16 x 128 tokens
LARGE_STEPS = 80
WALL_MINUTES = 3.0  # the equal-wall-time group: minutes of training per run, at most WALL_MAX_STEPS steps
WALL_MAX_STEPS = 400
# Every variant's training.lr comes from this grid: one tuning run per value (seed 100, the group's
# budget), scored on the tuning split (data.tune_fraction), never on the validation split.
LR_GRID = [1e-3, 3e-3, 1e-2]


def fortune_files() -> str:
  """The prose files of the fortunes package, comma-separated; the directory itself when absent,
  so that preparation fails naming it."""
  files = [path for path in sorted(glob.glob(os.path.join(FORTUNE_DIR, "*")))
           if not path.endswith((".dat", ".u8")) and not os.path.islink(path)
           and os.path.basename(path) not in NOT_PROSE]
  return ",".join(files) or FORTUNE_DIR


def get_study():
  tiny_budget = {"kind": "flops", "steps": TINY_STEPS, "reference": "qtg"}
  return {
      "name": "qtg_vs_gpt",
      "title": "QTG against a standard GPT at equal training FLOPs",
      "description": (
          "Tiny shape: d=64 (real width 128), 4 layers, 4 heads, windows of 128 tokens, batch 16, vocabulary "
          "2048, AdamW with 15 warmup steps and cosine decay to 0 over each run's own step count, its learning "
          f"rate chosen per variant from {LR_GRID} on a tuning split (2% of the standard library's documents, 5% "
          "of the fortunes; carved out of train by the document hash). "
          "Larger shape: d=96 (real width 192), 8 layers (4.5x the tiny QTG's block parameters). "
          "`gpt` is the standard pre-norm GPT of the same code (`model.w_psi=False`, "
          "`model.amplitude_embedding=False`, dot-product attention, no TopoFilter, lambdas 0). Second corpus: "
          "the English prose of the Debian package `fortunes` (`apt-get install fortunes`), one document per "
          "fortune (records between `%` lines, `data.text_split=percent_line`) from the 35 files of "
          "/usr/share/games/fortunes that are not code, ASCII art or OS tips: 12,584 documents, 2.09 MB, "
          "748k training, 42k validation and 37k tuning tokens (11,326 / 648 / 610 documents)."),
      "base_config": "configs/neon_qtg_tiny.py",
      "lr_grid": LR_GRID,
      "overrides": {
          # A tuning split needs a prepared directory of its own (the fraction is in its fingerprint).
          "data.tune_fraction": 0.02, "data.data_dir": "data/stdlib_tune02",
          "training.max_train_minutes": 0.0, "training.warmup_steps": 15, "training.keep_checkpoints": 1,
          "training.save_interval_minutes": 3.0, "training.sample_steps": 1_000_000, "training.log_steps": 25,
          "eval.stride": 128,
      },
      "baseline": "gpt",
      "headline": "qtg",
      "pictures": [("tiny_stdlib", "gpt"), ("tiny_stdlib", "qtg")],  # tools/analyze.py output in the report
      "groups": [
          {"name": "tiny_stdlib", "title": "Tiny shape, Python standard library corpus",
           "budget": tiny_budget, "overrides": {},
           "variants": [
               {"name": "gpt", "label": "standard GPT", "overrides": GPT, "seeds": 3, "tier": 1},
               {"name": "qtg", "label": "QTG (defaults)", "overrides": {}, "seeds": 3, "tier": 1},
               {"name": "dot_baseline", "label": "dot baseline (QTG without geo attention and filter)",
                "overrides": DOT_BASELINE, "seeds": 3, "tier": 2},
               {"name": "qtg_no_topofilter", "label": "QTG without TopoFilter",
                "overrides": {"model.topofilter": False, "training.lambda_topo": 0.0}, "seeds": 3, "tier": 2},
               {"name": "qtg_no_regularizers", "label": "QTG without the three regularizers",
                "overrides": NO_REGULARIZERS, "seeds": 3, "tier": 2},
               {"name": "qtg_gamma1", "label": "QTG with gamma = 1 (the seed's)",
                "overrides": {"model.gamma": 1.0}, "seeds": 3, "tier": 2},
               {"name": "gpt_equal_params", "label": "standard GPT, mlp_ratio 5 (QTG's parameter count)",
                "overrides": GPT | {"model.mlp_ratio": 5}, "seeds": 3, "tier": 3},
           ]},
          {"name": "tiny_fortunes", "title": "Tiny shape, English prose (Debian package fortunes)",
           "budget": tiny_budget,
           "overrides": {"data.source": "text", "data.paths": fortune_files(), "data.text_split": "percent_line",
                         "data.data_dir": "data/fortunes_tune05", "data.val_fraction": 0.05,
                         "data.tune_fraction": 0.05},
           "variants": [
               {"name": "gpt", "label": "standard GPT", "overrides": GPT, "seeds": 3, "tier": 1},
               {"name": "qtg", "label": "QTG (defaults)", "overrides": {}, "seeds": 3, "tier": 1},
           ]},
          {"name": "large_stdlib", "title": "Larger shape (d=96, 8 layers), Python standard library corpus",
           "budget": {"kind": "flops", "steps": LARGE_STEPS, "reference": "qtg"},
           "overrides": {"model.embed_dim": 96, "model.num_layers": 8},
           "variants": [
               {"name": "gpt", "label": "standard GPT", "overrides": GPT, "seeds": 2, "tier": 4},
               {"name": "qtg", "label": "QTG (defaults)", "overrides": {}, "seeds": 2, "tier": 4},
           ]},
          {"name": "tiny_stdlib_wall", "title": "Tiny shape, Python standard library corpus, equal wall time",
           "budget": {"kind": "wall_time", "minutes": WALL_MINUTES, "max_steps": WALL_MAX_STEPS}, "overrides": {},
           "variants": [
               {"name": "gpt", "label": "standard GPT", "overrides": GPT, "seeds": 3, "tier": 5},
               {"name": "qtg", "label": "QTG (defaults)", "overrides": {}, "seeds": 3, "tier": 5},
           ]},
      ],
      "notes": [
          "In the earlier study (commit 95808e2: 80-137 steps per run at the tiny config's learning rate), the "
          "pictures said this about QTG: its Fisher-Rao attention is almost exactly uniform over the "
          "prefix (attention entropy / log(t+1) of about 1.00 in layers 1-3, against 0.87-0.94 for the GPT; "
          "0.98-1.00 in all 8 layers of the larger QTG, against 0.39-0.97 per head for the larger GPT), and "
          "the learned gamma stays within 0.05 of its initial value; QTG with gamma 1 scores like QTG with "
          "gamma 8. At these training lengths the sphere points sqrt(softmax(q)) and sqrt(softmax(k)) of small "
          "q and k are nearly the same point, so every score -gamma arccos(BC)^2 is close to 0: QTG works as a "
          "causal running average followed by the MLP. Whatever QTG gains or loses here comes from that, not "
          "from a geometric selection of tokens.",
          "Short runs: each tiny run sees about 0.25M tokens, a larger-shape run about 0.17M. The comparisons "
          "are of how fast each model learns in its first few hundred steps on 2 CPU cores, not of converged "
          "models; a ranking can change with longer training or larger shapes.",
          "Equal FLOPs counts model FLOPs (`--mode=info`): the Fisher-Rao attention's arccos and the "
          "TopoFilter's distances cost more wall time per FLOP on a CPU than matmuls, so at equal wall time "
          "QTG would get fewer steps than here.",
          "Seeds change the initialisation and the data order together; 2-3 seeds give wide intervals, "
          "and an interval that excludes 0 at 3 seeds is still a weak result.",
          "The learning rate is chosen per variant from the same grid on the tuning split (one tuning run per "
          "value, seed 100); warmup, batch and the other hyperparameters are the tiny config's, not tuned.",
          "The prose corpus is small (about 2 MB of fortunes); its validation split is 5% of its documents.",
          "The train times per run were measured on a 2-core machine shared with other jobs (load 2 to 12); "
          "they are not a benchmark (tools/bench_train.py measures step-time ratios).",
          "Equal wall time is measured on a 2-core machine shared with other jobs: a run's steps depend on the "
          "load while it ran, and the learning-rate schedule spans the step cap, so a run the clock stops ends "
          "before its schedule does.",
          "Not shown: converged or large-scale behaviour, and anything about the 7b-100b configs.",
      ],
  }
