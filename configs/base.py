"""Base config: every field the trainer reads, with a short comment each.

Experiment configs (`moe_m.py`, `moe_l.py`, `demo.py`, ...) start from `get_config()` here and
change a few fields; `apply_variant` turns a variant name from the config string
(`configs/moe_m.py:simbal`) into field changes. Any field can be overridden on the command line:
`--config.moe.num_experts=16`.
"""

import ml_collections

# Balancing methods understood by the trainer (simbal_jax.step.BALANCE_METHODS mirrors this).
METHODS = ("none", "lbl", "simbal", "loss_free", "lf_lbl", "lf_simbal", "simbal_lbl")


def get_config(arg=None):
  """Returns the base ConfigDict (a small CPU-sized MoE on the stdlib corpus)."""
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0  # one seed, split into init / train / eval keys

  cfg.model = m = ml_collections.ConfigDict()
  m.vocab_size = 0  # 0: take the tokenizer's vocabulary size
  m.d_model = 128  # residual width
  m.num_layers = 2  # transformer blocks
  m.num_heads = 4  # attention heads (head dim = d_model / num_heads)
  m.d_ff = 512  # dense FFN width (used when moe.num_experts == 0)
  m.rope_theta = 1e4  # RoPE base
  m.moe_every = 1  # block i is MoE iff (i + 1) % moe_every == 0
  m.dtype = "float32"  # compute dtype
  m.param_dtype = "float32"  # parameter (master) dtype
  m.attention_impl = "auto"  # auto | xla | cudnn
  m.norm_eps = 1e-6  # RMSNorm epsilon
  m.remat = False  # rematerialise blocks in the backward pass

  cfg.moe = e = ml_collections.ConfigDict()
  e.num_experts = 8  # 0: dense model
  e.top_k = 2  # experts per token
  e.d_ff = 128  # expert SwiGLU width
  e.gating = "softmax_topk"  # softmax_topk (paper) | topk_softmax | sigmoid
  e.renormalize = False  # renormalise the k gates to sum 1 (softmax_topk)
  e.capacity_factor = 0.0  # <= 0: dropless (paper)
  e.shared_expert_d_ff = 0  # 0: no shared expert
  e.router_init = "orthogonal"  # orthogonal | normal
  e.router_init_scale = 1.0  # column norm of the initial router
  e.num_groups = 1  # routing groups (own capacity/dispatch); 0: one per batch shard (auto)
  # capacity | ragged. "ragged": dropless grouped matmul via jax.lax.ragged_dot (T*K rows, no
  # E/K padding; capacity_factor ignored; needs num_groups=1) - efficient on TPU; on GPU it
  # lowers to a dense E-times-larger computation (DESIGN §4), and on CPU to a masked dense one:
  # use "capacity" there.
  e.dispatch = "capacity"

  cfg.balance = b = ml_collections.ConfigDict()
  b.method = "lbl"  # one of METHODS
  b.lbl_coef = 0.01  # alpha of alpha * E * sum f_i P_i (uniform router -> 1.0)
  # sequence | batch | global. Under jit on global arrays "batch" and "global" both see the
  # whole global batch; with train.grad_accum > 1 each micro-batch is its own batch.
  b.lbl_scope = "batch"
  b.simbal_coef = 0.1  # coefficient of ||R^T R - I||_1 (paper: 0.1)
  b.simbal_norm = "l1"  # l1 (paper) | fro2
  b.simbal_normalize = False  # use unit-norm router columns (cosine Gram)
  b.simbal_reduction = "sum"  # sum (paper) | mean (divide by E^2)
  b.lf_rate = 1e-3  # Loss-Free bias update rate u: b += u * sign(mean - count)
  b.router_z_coef = 0.0  # router z-loss coefficient (0: off)

  cfg.opt = o = ml_collections.ConfigDict()
  o.peak_lr = 3e-3  # peak learning rate
  o.warmup_steps = 50  # linear warm-up steps
  o.warmup_init_frac = 0.1  # warm-up starts at this fraction of peak
  o.final_frac = 0.1  # cosine decays to this fraction of peak
  o.b1 = 0.9  # AdamW beta1
  o.b2 = 0.95  # AdamW beta2
  o.eps = 1e-8  # AdamW epsilon
  o.weight_decay = 0.01  # decoupled weight decay (matrices only)
  o.grad_clip = 1.0  # global-norm clipping (0: off)

  cfg.data = d = ml_collections.ConfigDict()
  d.source = "stdlib"  # stdlib | text_files | tfds | synthetic
  d.tokenizer = "bytes"  # bytes | sentencepiece | cl100k (ignored by synthetic)
  d.sp_vocab_size = 4096  # sentencepiece vocabulary when trained here
  d.sp_train_chars = 2_000_000  # sentencepiece training sample (characters)
  d.globs = ""  # text_files: comma-separated globs, ** allowed
  d.tfds_name = ""  # tfds: dataset name or a prepared builder dir
  d.tfds_data_dir = ""  # tfds: data_dir ("" = TFDS default)
  d.tfds_text_key = "text"  # tfds: feature holding the text
  d.tfds_train_split = "train"
  d.tfds_eval_split = "validation"  # "" = hold out eval_fraction of train documents
  d.eval_fraction = 0.05  # held-out share of documents (by document-id hash)
  d.max_docs = 0  # 0: all documents
  d.max_bytes = 0  # stdlib/text_files byte budget (0: no limit)
  d.cache_dir = ""  # "": <workdir>/data
  d.worker_count = 0  # grain worker processes (0: threads in-process)
  d.synthetic = s = ml_collections.ConfigDict()
  s.num_domains = 4  # latent domains (one random Markov chain each)
  s.vocab_size = 256  # chain states (EOS = vocab_size)
  s.doc_len = 0  # 0: seq_len + 1, one document per sequence
  s.num_docs = 4096  # synthetic documents
  s.seed = 0  # corpus seed (independent of the training seed)

  cfg.train = t = ml_collections.ConfigDict()
  t.seq_len = 128  # tokens per sequence
  t.global_batch_size = 16  # sequences per optimizer step (all hosts, all micro-batches)
  t.grad_accum = 1  # micro-batches per step (lax.scan)
  t.num_steps = 300  # optimizer steps (0: derive from token_budget)
  t.token_budget = 0  # training tokens; used when num_steps == 0
  t.z_loss = 1e-5  # output-logit z-loss coefficient
  t.eval_every = 100  # eval every N steps (0: only at the end)
  t.eval_batches = 4  # validation batches per eval
  t.debug_nan_step = -1  # testing hook: poison the loss at this step (-1: off)

  cfg.ckpt = c = ml_collections.ConfigDict()
  c.enabled = True  # write checkpoints into <workdir>/checkpoints
  c.every = 100  # save every N steps (and at the end / on preemption)
  c.max_to_keep = 3  # keep the last K
  c.async_save = True  # write in a background thread
  c.resume_from = ""  # checkpoint dir to resume from when the workdir has none
  c.init_from = ""  # checkpoint dir to take parameters only from (fresh optimizer)
  # Resume although these fields differ from the checkpoint's config (logged): "" (none), "all",
  # or comma-separated fields / groups ("opt.peak_lr,train.num_steps", "balance"). Fields that
  # change state shapes or the data order (simbal_jax/rundir.py STRUCTURAL) can never change.
  c.allow_config_change = ""
  # When the workdir's checkpoints cannot be resumed (all damaged, another config): move them
  # and a copy of metrics.jsonl to checkpoints/replaced.<time>/ and start at step 0 (else: error).
  c.start_over = False

  cfg.log = g = ml_collections.ConfigDict()
  g.every = 10  # log train metrics every N steps
  g.tensorboard = True  # also write TensorBoard event files
  g.progress = True  # tqdm progress bar

  cfg.mesh = h = ml_collections.ConfigDict()
  h.data = -1  # data-parallel axis (-1: all remaining devices)
  h.expert = 1  # expert-parallel axis
  h.model = 1  # tensor-parallel axis
  h.multihost = False  # call jax.distributed.initialize()

  if arg:
    apply_variant(cfg, arg)
  return cfg


def paper_config(*, d_model, num_layers, num_heads, rope_theta, peak_lr, global_batch_size,
                 token_budget):
  """The SimBal paper's MoE recipe (DESIGN.md section 1) at one model size.

  32 experts top-4 with expert d_ff = d_model, every FFN an MoE (Dense variant: 4 * d_model),
  cl100k vocabulary, bf16 compute (float32 master weights), AdamW with warm-up over 2000 steps,
  dropless routing. Batch and sequence length are ours (2048-token sequences); steps are derived
  from `token_budget` at start, after any command-line overrides.
  """
  cfg = get_config()
  cfg.model.vocab_size = 100277  # cl100k_base
  cfg.model.d_model = d_model
  cfg.model.num_layers = num_layers
  cfg.model.num_heads = num_heads
  cfg.model.d_ff = 4 * d_model  # the Dense variant's FFN
  cfg.model.rope_theta = rope_theta
  cfg.model.dtype = "bfloat16"  # bf16 compute, float32 master weights
  cfg.moe.num_experts = 32
  cfg.moe.top_k = 4
  cfg.moe.d_ff = d_model
  # Dropless as in the paper. At this batch that is a huge buffer: on GPU pass
  # --config.moe.capacity_factor=1.25, on TPU --config.moe.dispatch=ragged (README, Training).
  cfg.moe.capacity_factor = 0.0
  cfg.moe.num_groups = 0  # auto: one routing group per batch shard (mesh data x expert)
  cfg.opt.peak_lr = peak_lr
  cfg.opt.warmup_steps = 2000
  cfg.data.source = "tfds"  # DCLM prepared as TFDS array_record (one shard held out)
  cfg.data.tokenizer = "cl100k"
  cfg.train.seq_len = 2048
  cfg.train.global_batch_size = global_batch_size
  cfg.train.token_budget = token_budget
  cfg.train.num_steps = 0  # derived from token_budget at start, after any overrides
  cfg.train.eval_batches = 64
  cfg.ckpt.every = 1000
  cfg.log.every = 50
  return cfg


def set_method(cfg, method):
  """Sets cfg.balance.method, checking it against METHODS."""
  if method not in METHODS:
    raise ValueError(f"unknown balancing method {method!r}; valid: {', '.join(METHODS)}")
  cfg.balance.method = method


def apply_variant(cfg, arg):
  """Applies a variant string: comma-separated tokens, each one of

  <method>                  (none, lbl, simbal, loss_free, lf_lbl, lf_simbal, simbal_lbl)
  <method>_sigmoid / _softmax   the method with sigmoid (DeepSeek-V3) or softmax gating
  simbal_coef<x>            SimBal with coefficient x (simbal_coef1, simbal_coef0.01)
  dense                     no experts (dense FFN of 4 * d_model)
  key=value                 any field, e.g. moe.num_experts=16
  """
  for token in [s.strip() for s in str(arg).split(",") if s.strip()]:
    if "=" in token:
      key, value = token.split("=", 1)
      node = cfg
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      try:
        old = node[leaf]
        if isinstance(old, bool):
          node[leaf] = value.lower() in ("1", "true", "yes")
        elif isinstance(old, int):
          number = float(value)  # accepts 1e3 for an int field when it is a whole number
          if number != int(number):
            raise ValueError(f"{value!r} is not a whole number")
          node[leaf] = int(number)
        else:
          node[leaf] = type(old)(value)
      except (KeyError, AttributeError, ValueError, TypeError) as e:
        raise ValueError(f"config variant {token!r}: cannot set {key}: {e}") from None
    elif token == "dense":
      cfg.moe.num_experts = 0
      cfg.balance.method = "none"
    elif token.startswith("simbal_coef"):
      try:
        coef = float(token[len("simbal_coef"):])
      except ValueError:
        raise ValueError(f"config variant {token!r}: expected simbal_coef<number>, e.g. "
                         "simbal_coef0.1 (combine with other variants by commas: "
                         "simbal_coef1,moe.gating=sigmoid)") from None
      cfg.balance.method = "simbal"
      cfg.balance.simbal_coef = coef
    elif token.endswith("_sigmoid"):
      set_method(cfg, token[:-len("_sigmoid")])
      cfg.moe.gating = "sigmoid"
    elif token.endswith("_softmax"):
      set_method(cfg, token[:-len("_softmax")])
      cfg.moe.gating = "softmax_topk"
    else:
      if token not in METHODS:
        raise ValueError(
            f"unknown config variant {token!r}; valid: {', '.join(METHODS)}, "
            "<method>_sigmoid, <method>_softmax, simbal_coef<x>, dense, key=value")
      set_method(cfg, token)
  return cfg
