"""experiments/export.py: a tiny trained run, exported, loaded by `transformers`, gives the logits
of the project's forward pass (float32, CPU); a byte-level run's export carries a Hugging Face
tokenizer that lm-eval's `hf` model uses to score like the run; configs no architecture
represents are refused before anything is written."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from simbal_jax import env as env_lib
from simbal_jax import train
from simbal_jax.experiments import export

torch = pytest.importorskip("torch", reason="export tests need torch (pip install -e .[export])")
transformers = pytest.importorskip(
    "transformers", reason="export tests need transformers (pip install -e .[export])")
pytest.importorskip("safetensors",
                    reason="export tests need safetensors (pip install -e .[export])")

ATOL = 1e-4


def _config(variant, **moe):
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(variant, steps=2)
  cfg.ckpt.every, cfg.ckpt.async_save = 0, False
  cfg.train.pes_tokens, cfg.log.hist_tokens, cfg.log.churn_tokens = 0, 0, 0  # train and save only
  cfg.log.expert_movement = False
  for k, v in moe.items():
    (cfg.model if k in ("moe_every", "num_layers") else cfg.moe)[k] = v
  return cfg


# name -> (variant, overrides, expected architecture)
RUNS = {
    # softmax then top-k, dense block 0 and MoE block 1: Qwen2-MoE with decoder_sparse_step 2
    "softmax_topk_dense_moe": ("lbl", dict(moe_every=2), export.QWEN2_MOE),
    # trained on a byte-level text corpus (BYTES_RUN): its export has a Hugging Face tokenizer
    "softmax_topk_renorm": ("simbal", dict(renormalize=True), export.QWEN2_MOE),
    "topk_softmax": ("lbl", dict(gating="topk_softmax"), export.MIXTRAL),
    # sigmoid gating, Loss-Free bias (non-zero after 2 steps) and a shared expert of width
    # 48 = 1.5 expert widths (padded to 2 * 32 units)
    "sigmoid_lf_shared": ("lf_simbal_sigmoid", dict(shared_expert_d_ff=48), export.GLM4_MOE),
    "dense": ("dense", dict(num_experts=0), export.LLAMA),
}
BYTES_RUN = "softmax_topk_renorm"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """name -> (env, state, workdir, out dir) of a 2-step run exported in float32 (trained once,
  on first use)."""
  done = {}

  def get(name):
    if name not in done:
      variant, overrides, _ = RUNS[name]
      workdir = str(tmp_path_factory.mktemp(name))
      devices = jax.devices()[:1]
      cfg = _config(variant, **overrides)
      if name == BYTES_RUN:
        docs = tmp_path_factory.mktemp("docs")
        for i in range(40):
          (docs / f"doc{i}.txt").write_text(f"q{i}: a b x y zz a b a \u00e9\n" * (5 + i % 7))
        cfg.data.update(source="text_files", globs=str(docs / "*.txt"), tokenizer="bytes",
                        eval_fraction=0.2)
      # A dense run's checkpoint fails to save (its expert_bias [0, 0] is an array of zero size,
      # which Orbax refuses): its final state is exported as a restored one would be.
      cfg.ckpt.enabled = name != "dense"
      _, final = train.train_and_evaluate(cfg, workdir, devices=devices)
      out = str(tmp_path_factory.mktemp(name + "_hf"))
      with pytest.MonkeyPatch.context() as patch:
        if not cfg.ckpt.enabled:
          run_cfg = ml_collections.ConfigDict(json.loads(open(
              os.path.join(workdir, "config.json"), encoding="utf-8").read()))
          env = env_lib.build(run_cfg, workdir, devices)
          patch.setattr(env_lib, "restore_run", lambda *a, **k: (env, final))
        export.export_run(workdir, out, devices=devices)
        env, state = env_lib.restore_run(workdir, devices=devices)
      done[name] = env, state, workdir, out
    return done[name]
  return get


def _tokens(env, batch=3):
  rng = np.random.default_rng(0)
  return rng.integers(0, env.mcfg.vocab_size, (batch, int(env.cfg.train.seq_len)), np.int32)


def _jax_logits(env, state, tokens):
  bias = state.expert_bias if env.mcfg.moe is not None else None
  logits, _ = env.model.apply({"params": state.params}, tokens, expert_bias=bias)
  return np.asarray(logits, np.float32)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_transformers_logits_equal_the_projects(exported, name):
  env, state, _, out = exported(name)
  _, _, arch = RUNS[name]
  model = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert type(model).__name__ == arch and model.dtype == torch.float32
  tokens = _tokens(env)
  with torch.no_grad():
    got = model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  want = _jax_logits(env, state, tokens)
  diff = float(np.abs(got - want).max())
  print(f"{name} ({arch}): max |logit diff| = {diff:.2e}")
  assert got.shape == want.shape and diff <= ATOL
  meta = json.loads(open(os.path.join(out, export.META_FILE), encoding="utf-8").read())
  assert meta["architecture"] == arch and meta["step"] == 2
  if name == BYTES_RUN:
    assert meta["tokenizer"] == {"kind": "bytes", "vocab_size": 257, "eos_id": 256,
                                 "model_vocab_size": 257, "files": meta["tokenizer"]["files"]}
    assert "tokenizer.json" in meta["tokenizer"]["files"]
  else:
    assert meta["tokenizer"] == {"kind": "synthetic", "vocab_size": 65, "eos_id": 64,
                                 "model_vocab_size": 65}
  if name == "sigmoid_lf_shared":  # the Loss-Free bias moved: the test covers the choice
    assert np.any(np.asarray(state.expert_bias))


def test_bfloat16_export(exported):
  env, state, workdir, out = exported("softmax_topk_dense_moe")
  out16 = out + "_bf16"
  export.export_run(workdir, out16, dtype="bfloat16", devices=jax.devices()[:1])
  model = transformers.AutoModelForCausalLM.from_pretrained(out16, dtype="auto")  # 4.x: float32
  assert model.dtype == torch.bfloat16
  tokens = _tokens(env)
  with torch.no_grad():
    got = model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()
  assert np.abs(got - _jax_logits(env, state, tokens)).max() < 0.5
  assert os.path.getsize(os.path.join(out16, "model.safetensors")) < 0.6 * os.path.getsize(
      os.path.join(out, "model.safetensors"))


def test_nonzero_loss_free_bias_with_softmax_is_refused(exported, tmp_path, monkeypatch):
  env, state, workdir, _ = exported("softmax_topk_renorm")
  moved = state.replace(expert_bias=state.expert_bias.at[0, 1].add(1e-3))
  monkeypatch.setattr(env_lib, "restore_run", lambda *a, **k: (env, moved))
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="Loss-Free expert bias is non-zero") as e:
    export.export_run(workdir, str(out))
  assert "\n" not in str(e.value) and not out.exists()


def test_bytes_tokenizer_gives_the_runs_ids(tmp_path):
  from simbal_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  text = "def f(x):\n\treturn x  # caf\u00e9 \u2603 \U0001f600\r\n  end "
  want = tokenizers.BytesTokenizer().encode(text)
  export.bytes_hf_tokenizer(256, 64).save_pretrained(str(tmp_path))
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert hf.encode(text) == want and hf.eos_token_id == 256 and hf.model_max_length == 64
  assert hf.decode(want) == text


def test_sentencepiece_model_file_is_written(tmp_path):
  from simbal_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  model = tokenizers.train_sentencepiece(
      [f"line {i}: alpha beta gamma {i * 7}" for i in range(300)], str(tmp_path / "sp.model"),
      vocab_size=300)
  tok = tokenizers.SentencePieceTokenizer(model)
  out = tmp_path / "out"
  out.mkdir()
  mcfg = type("M", (), {"vocab_size": 320})()
  info = export.write_tokenizer(tok, mcfg, str(out))
  assert info == {"kind": "sentencepiece", "vocab_size": tok.vocab_size, "eos_id": 1,
                  "model_vocab_size": 320, "files": ["tokenizer.model"]}
  again = tokenizers.SentencePieceTokenizer(str(out / "tokenizer.model"))
  assert again.encode("line 3: alpha") == tok.encode("line 3: alpha")


def test_lm_eval_hf_model_scores_the_export_like_the_run(exported, tmp_path, monkeypatch):
  """`lm_eval --model hf --model_args pretrained=OUT` (its HFLM, built from the same argument
  string) gives the log-likelihoods that lm-eval gets from the run itself
  (experiments/downstream.SimbalLM, checked there against an independent scoring)."""
  pytest.importorskip("lm_eval")
  pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate "
                      "(pip install lm-eval[hf])")
  from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top
  from lm_eval.models.huggingface import HFLM  # pylint: disable=g-import-not-at-top
  from simbal_jax.experiments import downstream  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  env, state, _, out = exported(BYTES_RUN)
  pairs = [("q1: a b", " x y"), ("q2: a b", " zz"), ("", "a b a"), ("q3: a b x y", " zz a\u00e9")]
  hf = HFLM.create_from_arg_string(f"pretrained={out},dtype=float32",
                                   {"batch_size": 2, "device": "cpu"})
  got = hf.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
  want = downstream.SimbalLM(env, state, batch_size=2).score(pairs)
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4)
  assert [g[1] for g in got] == [w[1] for w in want]


REFUSED = [
    ("lbl_sigmoid", dict(moe_every=2, num_layers=4), "MoE layers to be the last blocks"),
    ("lbl", dict(shared_expert_d_ff=32), "gates its shared expert by a sigmoid"),
    ("lbl", dict(gating="topk_softmax", shared_expert_d_ff=32), "topk_softmax gating with a "
     "shared expert"),
]


def _run_dir(tmp_path, variant, overrides):
  """A run directory with only the config.json of the run (no checkpoint is needed to refuse)."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(_config(variant, **overrides).to_dict()))
  return workdir


@pytest.mark.parametrize("variant,overrides,match", REFUSED)
def test_unsupported_config_is_refused_before_anything_is_written(tmp_path, variant, overrides,
                                                                  match):
  workdir, out = _run_dir(tmp_path, variant, overrides), tmp_path / "out"
  with pytest.raises(ValueError, match=match) as e:
    export.export_run(str(workdir), str(out))
  assert "\n" not in str(e.value) and not out.exists()


def test_the_command_refuses_in_one_line(tmp_path):
  """One line on stderr, exit status 1, the output directory never created."""
  workdir, out = _run_dir(tmp_path, *REFUSED[0][:2]), tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "simbal_jax.experiments.export", f"--workdir={workdir}",
       f"--out={out}"], capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr
  assert lines[0].startswith("export refused: ") and REFUSED[0][2] in lines[0]
  assert not out.exists()
