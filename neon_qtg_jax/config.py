"""The one config schema shared by every config file, and its validation.

Every file under `configs/` starts from `default_config()` and changes values only;
`validate()` rejects unknown fields and bad values before any work starts, naming the
field. Field names follow the seed plan's YAML where it has one.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from typing import Any, Callable

import ml_collections

# model.attention takes the name of a registered attention kind (model/attention/): the registry,
# two layers above this module, adds its names here when it is imported (register_choices), and
# validate() reads them. Nothing here lists or compares the kinds themselves.
_CHOICES: dict[str, Callable[[], tuple[str, ...]]] = {}


def register_choices(field: str, names: Callable[[], tuple[str, ...]]) -> None:
  """Lets a higher layer supply the allowed values of a string field (`names()` is read at validation)."""
  _CHOICES[field] = names


# The modules that register a field's values, loaded by name the first time the field is validated: a plugin
# registry, so that this module imports nothing above it and validate() never lets a value through unchecked.
_REGISTRARS = {"model.attention": "neon_qtg_jax.model.attention", "data.languages": "neon_qtg_jax.data.languages"}


def choices(field: str) -> tuple[str, ...] | None:
  """The registered allowed values of a field (its registrar module loaded on first use), or None for a field
  that no layer registers."""
  if field not in _CHOICES and field in _REGISTRARS:
    importlib.import_module(_REGISTRARS[field])
  return _CHOICES[field]() if field in _CHOICES else None


SPHERE_MAPS = ("seed", "scaled", "normed")
TOPO_APPLY = ("inputs", "after_norm")  # model.topo_apply
SCALE_PARAMS = ("softplus", "exp")
ATTENTION_WIDTHS = ("complex", "residual")
W_PSI_INITS = ("normal", "orthogonal")
ATTENTION_IMPLS = ("auto", "reference", "blockwise", "pallas")
REMAT_POLICIES = ("none", "block", "dots", "dots_no_batch")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "relu")
DTYPES = ("float32", "bfloat16")
WEIGHT_DTYPES = ("float32", "bfloat16", "int8")  # inference/quantize.py
DATA_SOURCES = ("stdlib", "openwebtext", "jsonl", "text")
TEXT_SPLITS = ("file", "blank_line", "percent_line")
# data.filters (data/filters.py runs them): the steps in pipeline order, the presets, the word tokenizers
FILTER_STEPS = ("language", "length", "gopher_repetition", "gopher_quality", "c4", "fineweb_quality", "code",
                "exact_dedup", "minhash")
_WEB_EN = ("length", "gopher_repetition", "gopher_quality", "c4", "fineweb_quality", "exact_dedup", "minhash")
# web_en: FineWeb's English rules (fineweb: its old name); web: language ID, then each language's rules
# (data/languages.py); code: The Stack / StarCoder's file filters and dedup (docs/DATA.md)
FILTER_PRESETS = {"web_en": _WEB_EN, "fineweb": _WEB_EN, "web": ("language",) + _WEB_EN,
                  "code": ("code", "exact_dedup", "minhash")}
FILTER_TOKENIZERS = ("regex", "spacy")


# Logical axis -> mesh axes. Every parameter and the block-boundary activations name their axes
# (model/qtg.py); unlisted names (length, head_dim, norm, qkv, act_embed) are never split.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),   # rows of a batch
    ("layers", ()),                # the stacked-layer axis: a scan reads one layer at a time
    ("embed", ("fsdp",)),          # the 2d residual width of weights (FSDP: gathered per layer)
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),        # attention split by heads (QKV kernel, W_O input, gamma)
    ("mlp", ("tensor",)),          # the FFN hidden axis
    ("act_heads", ("tensor",)),
    ("cache_heads", ("fsdp",)),    # decode cache keys and values (layers, B, slots, heads, head_dim)
    ("cache_width", ("fsdp",)),    # decode cache unit states phi (layers, B, slots, 2d)
)
MESH_AXIS_NAMES = ("data", "fsdp", "tensor")

# Model fields that choose how the forward pass is computed, not what it computes: they change no
# parameter, so a checkpoint restores under other values (inference takes them from the current run).
MODEL_EXECUTION_FIELDS = ("dtype", "attention_impl", "blockwise_min_len", "block_q", "block_k", "remat",
                          "scan_layers", "dropout")

# training.backup_url: object stores through fsspec, or a directory path.
BACKUP_SCHEMES = {"s3": "s3fs", "gs": "gcsfs"}  # scheme -> the fsspec package it needs
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")


class ConfigError(ValueError):
  """A config value that cannot be used; the message names the field."""


def default_config() -> ml_collections.ConfigDict:
  """The full schema with the tiny CPU defaults. Config files override values only."""
  c = ml_collections.ConfigDict()
  c.name = "neon_qtg"
  c.seed = 0

  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 2048
  m.embed_dim = 64            # d: complex width; real width is 2d
  m.num_layers = 4
  m.num_heads = 4
  m.max_seq_len = 128
  m.persistence_threshold = 0.1
  m.tau = 1.0
  m.gamma = 8.0               # initial Fisher-Rao scale per head (the seed used 1.0)
  m.learn_gamma = True        # False freezes gamma at its initial value
  m.sphere_map = "normed"     # what sqrt(softmax(.)) receives: beta_h q / rms(q) ("normed"), beta_h q ("scaled"),
                              # q and k as projected ("seed", the spec's); model/attention/geo.py, docs/MODEL.md
  m.beta = 1.0                # initial per-head beta_h of the scaled and normed sphere maps (learned)
  m.scale_param = "softplus"  # gamma and beta kept positive as softplus(mult * raw) or exp(mult * raw)
  m.scale_lr_mult = 1.0       # mult above: a learning-rate multiplier for gamma and beta
  m.qk_init_std = 0.0         # init std of W_Q and W_K (0: init_std)
  m.w_psi_init = "orthogonal"  # W_psi: a random orthogonal matrix (norm-preserving), or "normal" (init_std, the spec's)
  m.dropout = 0.0
  m.attention = "geo"         # a registered attention kind (model/attention/): "geo" (Fisher-Rao), "dot" (plain
                              # GPT), "cosine" (geo's second-order twin); docs/MODEL.md
  m.topofilter = True         # False: f = psi, no s_t
  m.w_psi = True              # the 2d x 2d W_psi before the filter; False: psi = LN_1(h) (GPT block)
  m.amplitude_embedding = True  # unit-norm embedding; False: plain token + position sum (GPT)
  m.topo_k = 1                # mean of the k smallest causal distances
  m.topo_stop_grad = False    # stop gradients through s_t
  m.topo_apply = "inputs"     # where w_t acts: "inputs" (f = w psi only; the normed sphere map divides w out of
                              # q and k) or "after_norm" (also w times the normed map's q~, k~); docs/MODEL.md
  m.norm = "layernorm"
  m.activation = "gelu"
  m.mlp_ratio = 4             # W_1: 2d -> mlp_ratio * d (the spec's 4d; 8 is the standard GPT's 4x residual)
  m.attention_width = "complex"  # width of Q, K, V and W_O's input: d ("complex", the spec's) or 2d ("residual",
                                 # a standard-shape GPT)
  m.tie_embeddings = False    # logits from the token table (E LN_f(h)) instead of an untied W_lm
  m.use_bias = False
  m.norm_eps = 1e-5
  m.eps = 1e-6                # guard for the amplitude / unit-state normalisations
  m.init_std = 0.02
  m.dtype = "float32"         # compute dtype; parameters are always float32
  m.remat = "none"            # activation checkpointing per block
  m.scan_layers = False       # lax.scan over the stacked blocks (compile time)
  m.attention_impl = "auto"   # reference | blockwise | pallas | auto (by length)
  m.blockwise_min_len = 1024  # auto picks the blockwise kernels from this length on
  m.block_q = 128
  m.block_k = 128

  t = c.training = ml_collections.ConfigDict()
  t.lr = 3e-3
  t.end_lr = 0.0
  t.warmup_steps = 50         # clamped to total_steps: a shorter run warms up all its steps (training/optimizer.py)
  t.total_steps = 600
  t.beta1 = 0.9
  t.beta2 = 0.999
  t.adam_eps = 1e-8
  t.weight_decay = 0.01
  t.max_grad_norm = 1.0
  t.mu_dtype = "float32"      # AdamW first moment; the second moment stays float32
  t.batch_size = 16           # per optimizer step, across all devices, per microbatch
  t.grad_accum_steps = 1      # microbatches per optimizer step
  t.lambda_topo = 0.1
  t.lambda_geo = 0.05
  t.lambda_quantum = 0.01
  t.log_steps = 10
  t.eval_steps = 100
  t.eval_batches = 8
  t.save_steps = 200
  t.save_interval_minutes = 10.0
  t.keep_checkpoints = 3
  t.on_save_error = "stop"    # a checkpoint that cannot be written (disk full): "stop" the run or "continue"
  t.save_timeout_minutes = 20.0  # longest background save; with several processes, how long a save that
                                 # failed on one process holds the others before all of them see it
  t.collective_timeout_minutes = 30.0  # no step for this long (a hung collective, a stopped process): every
                                      # process exits with status 3 and a line naming the step; 0: never
  t.stop_grace_seconds = 120.0  # after SIGTERM/SIGINT, how long a main thread blocked in a wait may go without
                                # a step before the process exits without a save (status 143 / 130)
  t.sample_steps = 200
  t.max_consecutive_nonfinite = 5  # that many skipped non-finite steps in a row: roll back (the spike guard)
  t.spike_sigmas = 6.0        # a loss above the running mean by this many running std devs rolls back; 0: off
  t.spike_window = 100        # steps the running mean and std average over (and are seen before checking)
  t.spike_lr_scale = 1.0      # learning rate factor applied at each rollback (1: unchanged)
  t.spike_max_rollbacks = 3   # stop (exit 1) at the next event after this many rollbacks ...
  t.spike_rollback_window = 1000  # ... within this many steps
  t.max_train_minutes = 0.0   # 0: no wall-clock limit
  t.backup_url = ""           # s3://bucket/prefix, gs://bucket/prefix or a directory; empty: no backup
  t.backup_wait_minutes = 10.0  # how long the end of a run waits for pending backup uploads
  t.profile_start_step = 0    # first step of a JAX profiler trace into tensorboard/plugins/profile
  t.profile_num_steps = 0     # steps in the trace; 0: no trace

  d = c.data = ml_collections.ConfigDict()
  d.source = "stdlib"
  d.paths = ""                # comma-separated files, dirs or globs (not for stdlib)
  d.text_field = "text"
  d.text_split = "file"       # one document per file, or split on blank lines or "%" lines
  d.data_dir = "data/stdlib"  # prepared shards, tokenizer and manifest
  d.max_length = 128          # window length in tokens (<= model.max_seq_len)
  d.stride = 64
  d.val_fraction = 0.02
  d.tune_fraction = 0.0       # a tuning split carved out of train by the same hash (data/splits.py); 0: none
  d.tokenizer_sample_sentences = 50000  # lines sampled to train SentencePiece (unigram: ~20 s on 2 cores)
  d.tokenizer_model_type = "unigram"
  d.max_documents = 0         # 0: all
  d.num_workers = 0           # grain worker processes
  d.prefetch = 2
  d.shuffle_seed = 0
  # Pre-filtering before tokenization (data/filters.py, docs/DATA.md; needs the `filters` extra):
  # ordered comma-separated steps (data/filters.py STEPS), or a preset: "web_en" (FineWeb's English rules;
  # "fineweb" is the same), "web" (language ID + per-language rules), "code"; "": none.
  d.filters = ""
  d.languages = ""            # "language" step: lid.176 codes kept ("en", "ru", "en,ru"); "": any (labels only)
  d.language_threshold = 0.65  # lowest lid.176 score kept (FineWeb's)
  d.filters_preview = 300     # documents scored before the full pass; 0: no preview
  d.filters_preview_max_removed = 0.5  # stop before the full pass when the preview removes more; 1: never stop
  d.filters_preview_only = False  # print the preview and stop
  d.filter_tokenizer = "regex"  # words for the Gopher, C4, FineWeb and MinHash steps: "regex" or "spacy" (slower)
  d.filter_tasks = 0          # datatrove tasks; 0: the cores this run has. Kept documents do not depend on it
  d.filter_min_words = 50     # "length" step: whitespace-separated words per document (Gopher's bounds)
  d.filter_max_words = 100000
  d.minhash_ngrams = 5        # "minhash" step: word n-gram shingles, LSH buckets x hashes per bucket (FineWeb's)
  d.minhash_buckets = 14
  d.minhash_hashes_per_bucket = 8

  s = c.sampling = ml_collections.ConfigDict()
  s.temperature = 0.8
  s.top_k = 50
  s.top_p = 0.9
  s.max_new_tokens = 64
  s.prompts = ("def ", "import ", "The ")
  s.seed = 0

  n = c.inference = ml_collections.ConfigDict()
  n.weight_dtype = "float32"  # parameters for eval/generate/serve: float32 (training's), bfloat16, int8 (Qwix)

  v = c.serve = ml_collections.ConfigDict()
  v.slots = 8                 # sequences decoded together (cache rows); one compiled decode step for all
  v.max_queue = 32            # requests waiting for a slot; more get 429
  v.model_name = ""           # the id /v1/models reports; empty: the workdir's name
  v.drain_seconds = 60.0      # SIGTERM: how long in-flight requests may run before the server stops

  e = c.eval = ml_collections.ConfigDict()
  e.max_length = 128          # perplexity window (<= model.max_seq_len)
  e.stride = 64

  p = c.parallel = ml_collections.ConfigDict()
  p.data = 1                  # mesh sizes inside one node; -1 on one axis: what the device count leaves
  p.fsdp = -1
  p.tensor = 1
  p.dcn_data = 1              # multipliers across nodes (DCN); 1 on a single host
  p.dcn_fsdp = 1
  p.rules = LOGICAL_AXIS_RULES

  i = c.info = ml_collections.ConfigDict()
  i.mfu = 0.5                 # assumed model FLOPs utilisation for time estimates
  i.num_devices = 1           # devices the plan runs on (parameters and AdamW sharded over them)
  return c


def backup_url_problem(url: str) -> str | None:
  """Why `url` cannot be a backup location (None when it can): s3://bucket[/prefix], gs://... or a directory."""
  if not url or "://" not in url:
    return None
  scheme, rest = url.split("://", 1)
  if scheme not in BACKUP_SCHEMES:
    return f"scheme {scheme}:// is not supported; use s3://bucket/prefix, gs://bucket/prefix or a directory path"
  if not BUCKET_NAME.match(rest.split("/", 1)[0]):
    return f"{url!r} does not start with a valid bucket name ({scheme}://bucket/prefix)"
  package = BACKUP_SCHEMES[scheme]
  if importlib.util.find_spec(package) is None:
    return f"{scheme}:// needs the {package} package (pip install {package})"
  return None

def parse_filters(spec: str) -> tuple[str, ...]:
  """The ordered steps of a data.filters value: "" -> (), a preset name, or comma-separated FILTER_STEPS."""
  names = [n.strip() for n in spec.split(",") if n.strip()]
  if len(names) == 1 and names[0] in FILTER_PRESETS:
    return FILTER_PRESETS[names[0]]
  unknown = [n for n in names if n not in FILTER_STEPS]
  if unknown:
    raise ValueError(f"unknown step(s) {unknown}; steps are {list(FILTER_STEPS)} or a preset {list(FILTER_PRESETS)}")
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f"step(s) {repeated} given more than once")
  return tuple(names)


def filter_spec_problem(spec: str) -> str | None:
  """Why a data.filters value is unusable, or None."""
  try:
    parse_filters(spec)
  except ValueError as err:
    return str(err)
  return None


def parse_languages(spec: str) -> tuple[str, ...]:
  """data.languages: "" -> (), "en" -> ("en",), "en, ru" -> ("en", "ru") (order kept, duplicates an error)."""
  names = tuple(n.strip() for n in spec.split(",") if n.strip())
  if len(set(names)) != len(names):
    raise ValueError("a language is named more than once")
  return names


def languages_problem(spec: str, filters: str) -> str | None:
  """Why a data.languages value is unusable with data.filters, or None. The languages that have quality rules
  come from data/languages.py, which registers them (register_choices) when imported (choices() loads it)."""
  languages = choices("data.languages")
  try:
    names = parse_languages(spec)
  except ValueError as err:
    return str(err)
  if any(not re.fullmatch(r"[a-z]{2,3}", n) for n in names):
    return "languages are lid.176 codes such as 'en' or 'ru', comma-separated"
  try:
    steps = parse_filters(filters)
  except ValueError:
    return None     # data.filters reports its own problem
  if names and "language" not in steps:
    return "keeps languages only with the 'language' step (data.filters='web', or a list with 'language')"
  if "language" in steps and set(steps) & {"gopher_repetition", "gopher_quality", "c4", "fineweb_quality"}:
    if not names:
      return f"the per-language rules need the languages to keep, from {list(languages or ())}"
    unknown = [n for n in names if languages is not None and n not in languages]
    if unknown:
      return f"no quality rules for {unknown}: rules exist for {list(languages)} (data/languages.py)"
  return None


# Fields added after checkpoints were written, with the value that reproduces what those checkpoints
# were trained with (not today's default). complete_saved_config fills a saved config's gaps from here,
# then from default_config().
FIELDS_BEFORE_THEY_EXISTED: dict[str, Any] = {
    "model.sphere_map": "seed", "model.beta": 1.0, "model.scale_param": "softplus", "model.scale_lr_mult": 1.0,
    "model.qk_init_std": 0.0, "model.w_psi_init": "normal", "model.attention_width": "complex",
    "model.tie_embeddings": False, "model.topo_apply": "inputs",
}


def complete_saved_config(saved: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A config saved by an older version with every field it lacks: the value the older code used
  (FIELDS_BEFORE_THEY_EXISTED), else today's default. Fields the schema no longer has are kept."""
  saved_fields = _field_paths(saved)
  config = default_config()
  apply_overrides(config, {k: v for k, v in FIELDS_BEFORE_THEY_EXISTED.items() if k not in saved_fields},
                  "older checkpoint")
  for path, value in saved_fields.items():
    node = config
    *parents, leaf = path.split(".")
    for part in parents:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node[leaf] = value
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any], where: str) -> None:
  """Sets dotted fields ("model.attention": "dot") in place; an unknown field raises ConfigError naming it."""
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split(".")
    for part in parents:
      if part not in node:
        raise ConfigError(f"{where}: config field '{path}': unknown field")
      node = node[part]
    if leaf not in node:
      raise ConfigError(f"{where}: config field '{path}': unknown field")
    node[leaf] = value


def _field_paths(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in cfg.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_field_paths(value, path + "."))
    else:
      out[path] = value
  return out


def _check(ok: bool, field: str, message: str, value: Any) -> None:
  if not ok:
    raise ConfigError(f"config field '{field}' = {value!r}: {message}")


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field against the schema and the value rules; returns cfg.

  Raises ConfigError naming the first offending field.
  """
  schema = _field_paths(default_config())
  fields = _field_paths(cfg)
  for path in fields:
    _check(path in schema, path, "unknown field (not in the schema of neon_qtg_jax.config)", fields[path])
  for path in schema:
    _check(path in fields, path, "missing field", None)
  for path, value in fields.items():
    expected = schema[path]
    if isinstance(expected, bool):
      _check(isinstance(value, bool), path, "must be true or false", value)
    elif isinstance(expected, int):
      _check(isinstance(value, int) and not isinstance(value, bool), path, "must be an integer", value)
    elif isinstance(expected, float):
      ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
      _check(ok, path, "must be a finite number", value)
    elif isinstance(expected, str):
      _check(isinstance(value, str), path, "must be a string", value)

  m, t, d, s, e = cfg.model, cfg.training, cfg.data, cfg.sampling, cfg.eval

  def positive(section: str, names: tuple[str, ...], strict: bool = True) -> None:
    for name in names:
      value = cfg[section][name]
      _check(value > 0 if strict else value >= 0, f"{section}.{name}",
             "must be > 0" if strict else "must be >= 0", value)

  positive("model", ("vocab_size", "embed_dim", "num_layers", "num_heads", "max_seq_len",
                     "tau", "gamma", "topo_k", "mlp_ratio", "norm_eps", "eps", "init_std",
                     "blockwise_min_len", "block_q", "block_k"))
  positive("model", ("persistence_threshold", "qk_init_std"), strict=False)
  positive("model", ("beta", "scale_lr_mult"))
  _check(m.sphere_map in SPHERE_MAPS, "model.sphere_map", f"must be one of {SPHERE_MAPS}", m.sphere_map)
  _check(m.topo_apply in TOPO_APPLY, "model.topo_apply", f"must be one of {TOPO_APPLY}", m.topo_apply)
  _check(m.scale_param in SCALE_PARAMS, "model.scale_param", f"must be one of {SCALE_PARAMS}", m.scale_param)
  _check(m.w_psi_init in W_PSI_INITS, "model.w_psi_init", f"must be one of {W_PSI_INITS}", m.w_psi_init)
  _check(m.attention_width in ATTENTION_WIDTHS, "model.attention_width", f"must be one of {ATTENTION_WIDTHS}",
         m.attention_width)
  _check(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)", m.dropout)
  _check(m.embed_dim % m.num_heads == 0, "model.embed_dim",
         f"must be divisible by model.num_heads={m.num_heads}", m.embed_dim)
  kinds = choices("model.attention")
  _check(bool(m.attention) and (kinds is None or m.attention in kinds), "model.attention",
         f"must be one of {kinds} (the registered attention kinds)", m.attention)
  _check(m.attention_impl in ATTENTION_IMPLS, "model.attention_impl", f"must be one of {ATTENTION_IMPLS}",
         m.attention_impl)
  _check(m.remat in REMAT_POLICIES, "model.remat", f"must be one of {REMAT_POLICIES}", m.remat)
  _check(m.norm in NORMS, "model.norm", f"must be one of {NORMS}", m.norm)
  _check(m.activation in ACTIVATIONS, "model.activation", f"must be one of {ACTIVATIONS}", m.activation)
  _check(m.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}", m.dtype)

  positive("training", ("lr", "total_steps", "beta1", "beta2", "adam_eps", "max_grad_norm", "batch_size",
                        "grad_accum_steps", "log_steps", "eval_steps", "eval_batches", "save_steps",
                        "save_interval_minutes", "keep_checkpoints", "sample_steps",
                        "max_consecutive_nonfinite"))
  positive("training", ("end_lr", "warmup_steps", "weight_decay", "lambda_topo", "lambda_geo",
                        "lambda_quantum", "max_train_minutes"), strict=False)
  _check(t.beta1 < 1 and t.beta2 < 1, "training.beta1" if t.beta1 >= 1 else "training.beta2",
         "must be < 1", t.beta1 if t.beta1 >= 1 else t.beta2)
  _check(t.mu_dtype in DTYPES, "training.mu_dtype", f"must be one of {DTYPES}", t.mu_dtype)
  _check(t.end_lr <= t.lr, "training.end_lr", f"must be <= training.lr={t.lr}", t.end_lr)
  _check(t.on_save_error in ("stop", "continue"), "training.on_save_error", "must be 'stop' or 'continue'",
         t.on_save_error)
  positive("training", ("backup_wait_minutes", "profile_start_step", "profile_num_steps", "spike_sigmas",
                        "spike_max_rollbacks"), strict=False)
  positive("training", ("spike_window", "spike_rollback_window", "save_timeout_minutes", "stop_grace_seconds"))
  positive("training", ("collective_timeout_minutes",), strict=False)
  _check(0.0 < t.spike_lr_scale <= 1.0, "training.spike_lr_scale", "must be in (0, 1]", t.spike_lr_scale)
  _check(t.profile_num_steps == 0 or t.profile_start_step >= 1, "training.profile_start_step",
         "must be >= 1 (the first traced step, as logged) when training.profile_num_steps > 0", t.profile_start_step)
  backup_problem = backup_url_problem(t.backup_url)
  _check(backup_problem is None, "training.backup_url", str(backup_problem), t.backup_url)

  _check(d.source in DATA_SOURCES, "data.source", f"must be one of {DATA_SOURCES}", d.source)
  _check(d.text_split in TEXT_SPLITS, "data.text_split", f"must be one of {TEXT_SPLITS}", d.text_split)
  _check(d.source == "stdlib" or bool(d.paths), "data.paths",
         f"must name files for data.source={d.source!r}", d.paths)
  positive("data", ("max_length", "stride", "tokenizer_sample_sentences", "prefetch"))
  positive("data", ("max_documents", "num_workers", "shuffle_seed"), strict=False)
  _check(d.max_length <= m.max_seq_len, "data.max_length",
         f"window longer than model.max_seq_len={m.max_seq_len}", d.max_length)
  _check(d.stride <= d.max_length, "data.stride", f"must be <= data.max_length={d.max_length}", d.stride)
  _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)", d.val_fraction)
  _check(0.0 <= d.tune_fraction < 1.0 - d.val_fraction, "data.tune_fraction",
         f"must be in [0, 1 - data.val_fraction={d.val_fraction}) (train keeps the rest)", d.tune_fraction)
  _check(d.tokenizer_model_type in ("unigram", "bpe"), "data.tokenizer_model_type",
         "must be 'unigram' or 'bpe'", d.tokenizer_model_type)
  _check(d.filter_tokenizer in FILTER_TOKENIZERS, "data.filter_tokenizer", f"must be one of {FILTER_TOKENIZERS}",
         d.filter_tokenizer)
  filter_problem = filter_spec_problem(d.filters)
  _check(filter_problem is None, "data.filters", str(filter_problem), d.filters)
  language_problem = languages_problem(d.languages, d.filters)
  _check(language_problem is None, "data.languages", str(language_problem), d.languages)
  _check(0.0 <= d.language_threshold < 1.0, "data.language_threshold", "must be in [0, 1)", d.language_threshold)
  _check(0.0 < d.filters_preview_max_removed <= 1.0, "data.filters_preview_max_removed",
         "must be in (0, 1] (1: never stop)", d.filters_preview_max_removed)
  positive("data", ("filters_preview",), strict=False)
  positive("data", ("filter_tasks", "filter_min_words"), strict=False)
  positive("data", ("filter_max_words", "minhash_ngrams", "minhash_buckets", "minhash_hashes_per_bucket"))
  _check(d.filter_max_words > d.filter_min_words, "data.filter_max_words",
         f"must be > data.filter_min_words={d.filter_min_words}", d.filter_max_words)

  _check(s.temperature >= 0, "sampling.temperature", "must be >= 0 (0 is greedy)", s.temperature)
  _check(s.top_k >= 0, "sampling.top_k", "must be >= 0 (0 keeps all)", s.top_k)
  _check(0.0 < s.top_p <= 1.0, "sampling.top_p", "must be in (0, 1]", s.top_p)
  _check(s.max_new_tokens > 0, "sampling.max_new_tokens", "must be > 0", s.max_new_tokens)
  _check(e.max_length <= m.max_seq_len, "eval.max_length",
         f"window longer than model.max_seq_len={m.max_seq_len}", e.max_length)
  _check(0 < e.stride <= e.max_length, "eval.stride", f"must be in (0, eval.max_length={e.max_length}]",
         e.stride)
  _check(cfg.inference.weight_dtype in WEIGHT_DTYPES, "inference.weight_dtype", f"must be one of {WEIGHT_DTYPES}",
         cfg.inference.weight_dtype)
  positive("serve", ("slots", "max_queue", "drain_seconds"))
  _check(0.0 < cfg.info.mfu <= 1.0, "info.mfu", "must be in (0, 1]", cfg.info.mfu)
  _validate_parallel(cfg)
  _check(cfg.info.num_devices > 0, "info.num_devices", "must be > 0", cfg.info.num_devices)
  return cfg


def _validate_parallel(cfg: ml_collections.ConfigDict) -> None:
  """Mesh sizes and rules that are wrong whatever the device count (that is checked by parallel.mesh)."""
  p, m = cfg.parallel, cfg.model
  for name in MESH_AXIS_NAMES + ("dcn_data", "dcn_fsdp"):
    _check(p[name] > 0 or (p[name] == -1 and name in MESH_AXIS_NAMES), f"parallel.{name}",
           "must be > 0 (or -1 on one of data, fsdp, tensor)", p[name])
  seen = set()
  for entry in p.rules:
    ok = (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], tuple)
          and all(axis in MESH_AXIS_NAMES for axis in entry[1]) and entry[0] not in seen)
    _check(ok, "parallel.rules", f"each rule is (logical name, tuple of mesh axes from {MESH_AXIS_NAMES}), "
           "each name once", entry)
    seen.add(entry[0])
  if p.tensor > 0:
    _check(m.num_heads % p.tensor == 0, "parallel.tensor", f"must divide model.num_heads={m.num_heads}", p.tensor)
    _check(m.mlp_ratio * m.embed_dim % p.tensor == 0, "parallel.tensor",
           f"must divide the FFN width model.mlp_ratio * model.embed_dim={m.mlp_ratio * m.embed_dim}", p.tensor)


def apply_assignments(cfg: ml_collections.ConfigDict, assignments: list[str]) -> ml_collections.ConfigDict:
  """Applies "section.field=value" strings (the tools' --config.section.field=value) typed by the schema.

  Raises ConfigError naming the field for an unknown field or a value of the wrong type; call
  validate() afterwards for the value rules.
  """
  schema = _field_paths(default_config())
  for assignment in assignments:
    path, sep, text = assignment.partition("=")
    _check(bool(sep), path, "expected section.field=value", assignment)
    _check(path in schema, path, "unknown field (not in the schema of neon_qtg_jax.config)", text)
    expected = schema[path]
    try:
      if isinstance(expected, bool):
        _check(text.lower() in ("true", "false"), path, "must be true or false", text)
        value: Any = text.lower() == "true"
      elif isinstance(expected, (int, float, str)):
        value = type(expected)(text)
      else:
        raise ConfigError(f"config field '{path}': cannot be set from the command line")
    except ValueError:
      raise ConfigError(f"config field '{path}' = {text!r}: must be a {type(expected).__name__}") from None
    section, name = path.rsplit(".", 1)
    node = cfg
    for part in section.split("."):
      node = node[part]
    node[name] = value
  return cfg
