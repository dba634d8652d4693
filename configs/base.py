"""Base config: every field the trainer reads, with a short comment each.

Experiment configs (`moe_m.py`, `moe_l.py`, `demo.py`, ...) start from `get_config()` here and
change a few fields; `apply_variant` turns a variant name from the config string
(`configs/moe_m.py:simbal`) into field changes. Any field can be overridden on the command line:
`--config.moe.num_experts=16` (the one override mechanism: ml_collections' own).
"""

import ml_collections


def get_config(arg=None):
  """Returns the base ConfigDict (a small CPU-sized MoE on the stdlib corpus)."""
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0  # root key: split into the init key and the train key (state.rng, split per step
  # and per use: step.step_keys); PES samples its eval tokens with the root key itself

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
  # Router noise in training (evaluation is deterministic): none | jitter (router input times
  # U[1-eps, 1+eps], Switch Transformer) | gaussian (logits + eps N(0,1)) | gaussian_learned
  # (logits + softplus(x W_noise) N(0,1), noisy top-k). Keys: the train state's (per step).
  e.router_noise = "none"
  e.router_noise_eps = 0.01
  # Router: token_choice (each token its top-k experts) | expert_choice (Zhou et al. 2022: each
  # expert takes its C = T*k/E (x capacity_factor when > 0) best tokens of the routing group;
  # even load, a token gets 0..E experts; not causal - it sees later tokens of the sequence -
  # so evaluation also reports eval/causal_loss, token-choice top-k on the same router; needs
  # softmax_topk gating, dispatch capacity or buckets) | sinkhorn (BASE layers: in training
  # top-k of a balanced Sinkhorn plan of the group, gates as token choice; evaluation top-k).
  e.router = "token_choice"
  e.sinkhorn_iters = 8  # router=sinkhorn: Sinkhorn iterations per routing group (>= 1)
  e.num_groups = 1  # routing groups (own capacity/dispatch); 0: one per batch shard (auto)
  # capacity | buckets | ragged. "buckets": dropless capacity path at the smallest of the static
  # capacity_buckets (x mean load T*K/E per group, then T) holding the step's largest expert
  # load (jax.lax.switch; same values and grads as capacity_factor 0, cost = that bucket's
  # padding; capacity_factor ignored) - the dropless choice on CPU. "ragged": dropless grouped
  # matmuls (T*K rows, no E/K padding; capacity_factor ignored; needs num_groups=1), local to
  # each device under a mesh (shard_map: tokens all-gathered along mesh.expert, each device runs
  # its own experts); Pallas kernels on GPU/TPU; on CPU a masked dense computation (use buckets).
  e.dispatch = "capacity"
  e.capacity_buckets = (1.25, 1.5, 2.0, 3.0)  # dispatch=buckets: factors below the last bucket T
  # dispatch=ragged: auto (by the platform compiled for - CPU: xla; GPU: tokamax's choice; TPU:
  # megablox) | tokamax | xla | triton | mosaic | megablox (JAX's Pallas TPU grouped matmul) |
  # lax (jax.lax.ragged_dot, no tokamax; dense E-times-larger on GPU)
  e.ragged_impl = "auto"
  # dispatch=ragged with mesh.expert > 1: each device's buffer = this x its mean load (local
  # tokens x K); <= 0: the worst case (buffer = mesh.expert x mean). The assignments beyond
  # it: fallback (dropless: computed on their tokens' devices through the expert kernels
  # gathered along mesh.expert, only in a call that has them) | drop (train/dropped).
  e.expert_buffer_factor = 1.25
  e.expert_overflow = "fallback"

  cfg.balance = b = ml_collections.ConfigDict()
  # Balancing terms "name:coef+name:coef" from the registry simbal_jax.balance.TERMS (lbl,
  # simbal, simbal_unit, colnorm, router_z, ...); a name alone takes its default coefficient
  # (lbl 0.01 = alpha of alpha * E * sum f_i P_i, uniform router -> 1.0; simbal 0.1 = the
  # paper's coefficient of ||R^T R - I||_1); "" = no balancing loss.
  b.terms = "lbl:0.01"
  b.loss_free = False  # Loss-Free (aux-loss-free) selection bias, updated after each step
  b.lf_rate = 1e-3  # Loss-Free bias update rate u: b += u * sign(mean - count) (0: frozen)
  # sequence | micro | batch | global. "batch" is the (micro-)batch: the whole global batch
  # under jit when train.grad_accum == 1. "global" is the whole global batch also with
  # grad_accum > 1 (one extra forward pass to get its expert fractions first). "micro": f and P
  # of each group of lbl_micro_sequences consecutive sequences, the mean over groups (the LBL of
  # one device's micro-batch in data-parallel training, independent of the mesh here).
  b.lbl_scope = "batch"
  b.lbl_micro_sequences = 1  # sequences per group of lbl_scope="micro" (divides the batch)
  b.simbal_norm = "l1"  # l1 (paper) | fro2
  b.simbal_reduction = "sum"  # sum (paper) | mean (divide by E^2)

  cfg.opt = o = ml_collections.ConfigDict()
  o.peak_lr = 3e-3  # peak learning rate
  o.warmup_steps = 50  # linear warm-up steps (0: none, start at peak)
  o.warmup_init_frac = 0.1  # warm-up starts at this fraction of peak
  o.final_frac = 0.1  # cosine decays to this fraction of peak
  o.b1 = 0.9  # AdamW beta1
  o.b2 = 0.95  # AdamW beta2
  o.eps = 1e-8  # AdamW epsilon
  o.weight_decay = 0.01  # decoupled weight decay (matrices only; 0: off)
  o.grad_clip = 1.0  # global-norm clipping (0: off)

  cfg.data = d = ml_collections.ConfigDict()
  d.source = "stdlib"  # stdlib | text_files | tfds | synthetic | jsonl | parquet
  d.tokenizer = "bytes"  # bytes | sentencepiece | cl100k (ignored by synthetic)
  d.sp_vocab_size = 4096  # sentencepiece vocabulary when trained here
  d.sp_train_chars = 2_000_000  # sentencepiece training sample (characters)
  d.globs = ""  # text_files / jsonl (.jsonl[.gz|.zst]) / parquet: comma-separated globs, ** ok
  d.text_field = "text"  # jsonl / parquet: field (column) holding each record's text
  d.tfds_name = ""  # tfds: dataset name or a prepared builder dir
  d.tfds_data_dir = ""  # tfds: data_dir ("" = TFDS default)
  d.tfds_text_key = "text"  # tfds: feature holding the text
  d.tfds_train_split = "train"
  d.tfds_eval_split = "validation"  # "" = hold out eval_fraction of train documents
  d.eval_fraction = 0.05  # held-out share of documents (by document-id hash)
  d.max_docs = 0  # 0: all documents
  d.max_bytes = 0  # byte budget in whole files, stdlib/text_files/jsonl/parquet (0: no limit)
  d.cache_dir = ""  # "": <workdir>/data
  d.worker_count = 0  # grain worker processes (0: threads in-process)
  # Tokenizer processes per host when preparing (-1: one per CPU core, at most 32; 0 or 1:
  # in-process); the token streams are the same whatever the number.
  d.prepare_workers = -1
  # Several hosts: each tokenizes only its share of the training files (TFDS: records) and
  # trains on it; every host holds the whole validation split. False: every host prepares
  # everything and reads its slice of one global shuffle (the single-host order).
  d.shard_hosts = True
  # Attention within documents: batches carry segment_ids (a new document at every EOS), the
  # model masks attention across them. False: causal attention over the whole packed sequence.
  d.document_mask = False
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
  t.z_loss = 1e-5  # output-logit z-loss coefficient (0: off)
  # Evaluation: a fixed set of sequences spread over the whole held-out split, the same for
  # every run with the same data settings (methods and seeds of one comparison).
  t.eval_tokens = 16384  # evaluation-set size in tokens (rounded up to whole global batches)
  t.num_evals = 8  # evaluations per run, the last at the final step (0: only at the end)
  t.eval_spacing = "linear"  # linear | log: where the num_evals evaluations fall in the run
  t.eval_every = 0  # > 0: evaluate every N steps instead of num_evals
  t.pes_tokens = 0  # > 0: exact PES (all expert pairs) on this many eval tokens at the end
  # More held-out sets, each evaluated as the main one (eval_tokens tokens) under eval_<name>/,
  # with its per-layer load shift from the main set (load_tv): comma-separated name=source[:arg],
  # arg = globs separated by | (text_files, jsonl, parquet) or the tfds name; the other data
  # fields are data.*'s, the tokenizer the run's ("py=stdlib,web=jsonl:/d/*.jsonl.zst").
  t.eval_sets = ""

  cfg.ckpt = c = ml_collections.ConfigDict()
  c.enabled = True  # write checkpoints into <workdir>/checkpoints
  c.every = 100  # save every N steps (and at the end / on preemption; 0: only those)
  c.max_to_keep = 3  # keep the last K (>= 1)
  c.async_save = True  # write in a background thread
  c.resume_from = ""  # checkpoint dir to resume from when the workdir has none
  c.init_from = ""  # checkpoint dir to take parameters only from (fresh optimizer)
  # Resume although these fields differ from the checkpoint's config (logged): "" (none), "all",
  # or comma-separated fields / groups ("opt.peak_lr,train.num_steps", "balance"). Fields that
  # change state shapes or the data order (simbal_jax/runio/rundir.py STRUCTURAL) can never change.
  c.allow_config_change = ""
  # When the workdir's checkpoints cannot be resumed (all damaged, another config): move them
  # and a copy of metrics.jsonl to checkpoints/replaced.<time>/ and start at step 0 (else: error).
  c.start_over = False

  cfg.log = g = ml_collections.ConfigDict()
  g.every = 10  # log train metrics every N steps (>= 1)
  g.tensorboard = True  # also write TensorBoard event files
  g.progress = True  # tqdm progress bar
  # Peak TFLOP/s of one device for train/mfu (0: the datasheet value of the device kind,
  # simbal_jax.memory.PEAK_TFLOPS; no MFU where unknown, e.g. CPU).
  g.peak_tflops = 0.0
  g.hist_tokens = 4096  # router-logit histograms (TensorBoard) over this many eval tokens (0: off)
  # Routing churn at every evaluation since the previous one (eval/churn: 1 - mean top-k overlap)
  # on this many eval tokens (the first of the evaluation set; 0: off).
  g.churn_tokens = 4096
  # Each expert's weight movement since the previous evaluation relative to its norm
  # (eval/expert_move, eval/stagnant; per expert in expert_load.jsonl). Keeps one copy of the
  # expert weights on the devices.
  g.expert_movement = True
  # Weights & Biases (the `wandb` extra): a project name turns it on ("": off). It gets what
  # TensorBoard gets (scalars, images, histograms, hparams); files in <workdir>/wandb.
  g.wandb_project = ""
  g.wandb_entity = ""  # team or user ("": wandb's default)
  # "online", "offline" (no network: files only, `wandb sync <workdir>/wandb/offline-run-*`
  # uploads them later), "disabled", or "" (WANDB_MODE from the environment, else online).
  g.wandb_mode = ""
  # "START:STOP": a jax.profiler trace of the steps after START up to STOP into
  # <workdir>/tb/plugins/profile/ (TensorBoard's profile plugin); "": off.
  g.profile_steps = ""
  # eval/undecided: the share of eval tokens whose top-1 router probability is below 1/E + this
  # (routing barely above uniform; softmax gating).
  g.undecided_delta = 0.05
  # Each routed expert's weight and gradient norm, from the train step at every log step
  # (train/layer_<i>/expert_wnorm_ratio, expert_gnorm_ratio: min/max over the layer's experts;
  # per expert in expert_load.jsonl and TensorBoard images). Outputs only: training unchanged.
  g.expert_norms = True

  cfg.mesh = h = ml_collections.ConfigDict()
  h.data = -1  # data-parallel axis (-1: all remaining devices)
  h.fsdp = 1  # fully sharded data parallel: params + optimizer state split over d_model, batch too
  h.expert = 1  # expert-parallel axis
  h.model = 1  # tensor-parallel axis
  h.multihost = False  # call jax.distributed.initialize()

  if arg:
    apply_variant(cfg, arg)
  return cfg


def paper_config(*, d_model, num_layers, num_heads, rope_theta, peak_lr, global_batch_size,
                 token_budget):
  """The SimBal paper's MoE recipe (arXiv 2506.14038, its model table) at one model size.

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
  # Dropless as in the paper, through grouped matmuls (tokamax's kernels on GPU / TPU; on CPU
  # its XLA fallback is a masked dense computation: use moe.dispatch=buckets there).
  # --config.moe.dispatch=capacity --config.moe.capacity_factor=1.25 for capacity experiments.
  cfg.moe.dispatch = "ragged"
  cfg.moe.capacity_factor = 0.0
  cfg.moe.num_groups = 0  # auto: one group for ragged; one per batch shard for capacity
  cfg.opt.peak_lr = peak_lr
  cfg.opt.warmup_steps = 2000
  cfg.data.source = "tfds"  # DCLM prepared as TFDS array_record (one shard held out)
  cfg.data.tokenizer = "cl100k"
  cfg.train.seq_len = 2048
  cfg.train.global_batch_size = global_batch_size
  cfg.train.token_budget = token_budget
  cfg.train.num_steps = 0  # derived from token_budget at start, after any overrides
  cfg.train.eval_tokens = 64 * global_batch_size * 2048
  cfg.train.num_evals = 40
  cfg.train.pes_tokens = 4096
  cfg.ckpt.every = 1000
  cfg.log.every = 50
  return cfg


def set_method(cfg, method):
  """Sets the `balance.*` fields of a named method (simbal_jax.balance.METHODS)."""
  from simbal_jax import balance  # pylint: disable=g-import-not-at-top  (jax: not for data/)
  cfg.balance.update(balance.method_settings(method))


# The variant forms besides a bare method name (parsed by `apply_variant`).
VARIANT_FORMS = ("<method>_sigmoid", "<method>_softmax", "simbal_coef<x>", "lbl_micro<m>",
                 "<variant>+<noise>", "<variant>+<router>", "ec", "sinkhorn", "dense")
# Router names of variants (`<variant>+<router>`, or alone: no balancing term) -> moe.router.
ROUTER_FORMS = {"ec": "expert_choice", "expert_choice": "expert_choice", "sinkhorn": "sinkhorn"}


def variants():
  """The variant tokens `apply_variant` accepts: the method names, then `VARIANT_FORMS`."""
  from simbal_jax import balance  # pylint: disable=g-import-not-at-top  (jax: not for data/)
  return (*balance.METHODS, *VARIANT_FORMS)


def apply_variant(cfg, arg):
  """Applies a variant string: comma-separated tokens, each one of

  <method>                  a named method of simbal_jax.balance.METHODS (none, lbl, simbal,
                            simbal_unit, colnorm, simbal_lbl, loss_free, lf_lbl, lf_simbal)
  <method>_sigmoid / _softmax   the method with sigmoid (DeepSeek-V3) or softmax gating
  simbal_coef<x>            SimBal alone with coefficient x (simbal_coef1, simbal_coef0.01)
  lbl_micro<m>              LBL alone over groups of m consecutive sequences (lbl_scope="micro",
                            lbl_micro_sequences=m: lbl_micro1, lbl_micro4)
  <variant>+<noise>         the variant with router noise in training (moe.router_noise: jitter,
                            gaussian, gaussian_learned; eps moe.router_noise_eps): lbl+jitter
  <variant>+<router>        the variant with another router (moe.router; `ROUTER_FORMS`: ec or
                            expert_choice, sinkhorn): simbal+ec, lbl+sinkhorn, simbal+ec+jitter
  ec / sinkhorn             that router with no balancing term (method none)
  dense                     no experts (dense FFN of 4 * d_model)

  Any other field: `--config.<field>=<value>` on the command line (or `cfg.<field> = ...`).
  """
  from simbal_jax import balance  # pylint: disable=g-import-not-at-top  (jax: not for data/)
  for token in [s.strip() for s in str(arg).split(",") if s.strip()]:
    if "=" in token:
      key = token.split("=", 1)[0]
      raise ValueError(f"config variant {token!r}: set fields with --config.{key}=... on the "
                       "command line, not in the config string")
    if "+" in token:
      from simbal_jax import routing  # pylint: disable=g-import-not-at-top
      base, suffix = token.rsplit("+", 1)
      if suffix not in routing.ROUTER_NOISES[1:] and suffix not in ROUTER_FORMS:
        raise ValueError(f"config variant {token!r}: after '+' a router noise ("
                         f"{', '.join(routing.ROUTER_NOISES[1:])}) or a router ("
                         f"{', '.join(ROUTER_FORMS)})")
      apply_variant(cfg, base)
      if suffix in ROUTER_FORMS:
        cfg.moe.router = ROUTER_FORMS[suffix]
      else:
        cfg.moe.router_noise = suffix
    elif token in ROUTER_FORMS:
      set_method(cfg, "none")
      cfg.moe.router = ROUTER_FORMS[token]
    elif token == "dense":
      cfg.moe.num_experts = 0
      set_method(cfg, "none")
    elif token.startswith("simbal_coef"):
      try:
        coef = float(token[len("simbal_coef"):])
      except ValueError:
        raise ValueError(f"config variant {token!r}: expected simbal_coef<number>, e.g. "
                         "simbal_coef0.1 (combine with other variants by commas: "
                         "simbal_coef1,simbal_sigmoid)") from None
      cfg.balance.update(balance.method_settings("simbal"))
      cfg.balance.terms = balance.format_terms(balance.parse_terms(f"simbal:{coef}"))
    elif token.startswith("lbl_micro"):
      m = token[len("lbl_micro"):]
      if not m.isdigit() or int(m) < 1:
        raise ValueError(f"config variant {token!r}: expected lbl_micro<m> with an integer "
                         "m >= 1 sequences per group, e.g. lbl_micro4")
      set_method(cfg, "lbl")
      cfg.balance.lbl_scope, cfg.balance.lbl_micro_sequences = "micro", int(m)
    elif token.endswith("_sigmoid") and token[:-len("_sigmoid")] in balance.METHODS:
      set_method(cfg, token[:-len("_sigmoid")])
      cfg.moe.gating = "sigmoid"
    elif token.endswith("_softmax") and token[:-len("_softmax")] in balance.METHODS:
      set_method(cfg, token[:-len("_softmax")])
      cfg.moe.gating = "softmax_topk"
    elif token in balance.METHODS:
      set_method(cfg, token)
    else:
      raise ValueError(f"unknown config variant {token!r}; valid: {', '.join(variants())}")
  return cfg
