"""Train the embedded default model: a small Llama that writes Python, learned from the
Python standard library's own source.

Why: a serving library should produce meaningful text out of the box, without a download,
and its tests need a model whose predictions are confident (a random tiny checkpoint's top
logits are nearly tied, so greedy agreement with Hugging Face says little). Every machine that
runs this project has the standard library's source, so the corpus needs no network either.

The pipeline, one small function each:
  corpus     the stdlib's .py files in sorted order; every VAL_EVERY-th file is held out
  tokenizer  a byte-level BPE trained with `tokenizers` (lossless on code: whitespace and
             newlines round-trip)
  model      a dense causal Llama written in jax.numpy, trained in float32 with optax (AdamW,
             warm-up then cosine decay, gradient clipping)
  checkpoint the weights rounded to bfloat16 (half the bytes to commit; float32 holds them
             exactly, so a float32 run of either library computes the same function), written
             by `transformers` itself, loaded back to check that Hugging Face's logits equal
             ours, and described by a model card

    python -m experiments.train_default_model [--steps N] [--out DIR] [--draft]

About four million parameters (hidden 256, 4 layers, 4 query and 2 KV heads, tied embeddings,
a 4096-token vocabulary): about 8 MB to commit, trained in about 12 minutes on two CPU cores.

With --draft, its draft model for speculative decoding (models/stdlib-llama-draft): the same
corpus and the default model's own tokenizer (a draft needs the target's vocabulary), a
quarter of its layers' width and half its depth (hidden 128, 2 layers, 2 query heads and 1 KV
head of 64), about 0.7M parameters.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import platform
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from experiments.common import device_kind

Params = dict[str, jax.Array]  # Hugging Face's tensor names; linear weights stored [in, out]

SEED = 0
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "models" / "stdlib-llama"
SKIPPED_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages",
                "encodings", "pydoc_data", "__pycache__"}  # tests, vendored code, data tables
VAL_EVERY = 40  # every 40th file (sorted by path) is validation, never trained on
EOS = "<|endoftext|>"  # ends each file; the only special token (BOS = EOS, as in GPT-2)
EOS_ID = 0  # special tokens come first in a trained BPE vocabulary

VOCAB_SIZE = 4096
HEAD_DIM = 64
DRAFT_OUT = DEFAULT_OUT.with_name("stdlib-llama-draft")


@dataclass(frozen=True)
class Shape:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    mlp: int = 688  # about 8/3 of hidden, as in Llama


DEFAULT_SHAPE = Shape()
DRAFT_SHAPE = Shape(hidden=128, layers=2, heads=2, kv_heads=1, mlp=344)
NORM_EPS = 1e-5
ROPE_THETA = 10000.0
SEQ_LEN = 256  # also the model's max_position_embeddings: no position it has not trained on

BATCH_SIZE = 8  # windows of SEQ_LEN tokens per step: many small steps suit a short run
DEFAULT_STEPS = 650  # about 12 minutes on two quiet CPU cores (1.0 s a step, 40 s besides)
PEAK_LR = 2e-3
WARMUP_FRACTION = 0.05
WEIGHT_DECAY = 0.1
CLIP_NORM = 1.0
VAL_WINDOWS = 64  # fixed validation windows of SEQ_LEN + 1 tokens
PROMPTS = ["def __init__(self", "import os\n", "class Path:\n    "]
SAMPLE_TOKENS = 48  # new tokens per greedy sample in the model card


# --- corpus and tokenizer ---------------------------------------------------------------------

def stdlib_sources(stdlib: Path) -> list[Path]:
    """The standard library's .py files outside SKIPPED_DIRS, in a fixed (sorted) order."""
    files = (p for p in stdlib.rglob("*.py") if not SKIPPED_DIRS & set(p.relative_to(stdlib).parts[:-1]))
    return sorted(files, key=lambda p: p.relative_to(stdlib).as_posix())


def split_corpus(files: list[Path]) -> tuple[list[str], list[str]]:
    """(train texts, validation texts): whole files, every VAL_EVERY-th one held out."""
    texts = [f.read_text(encoding="utf-8") for f in files]
    train = [t for i, t in enumerate(texts) if i % VAL_EVERY]
    val = [t for i, t in enumerate(texts) if not i % VAL_EVERY]
    return train, val


def train_tokenizer(texts: list[str]) -> Tokenizer:
    """Byte-level BPE: any text encodes (no unknown token) and decodes back exactly."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    assert tokenizer.token_to_id(EOS) == EOS_ID and tokenizer.get_vocab_size() == VOCAB_SIZE
    return tokenizer


def token_stream(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """All texts as one stream of token ids, each file followed by EOS."""
    return np.concatenate([np.array(e.ids + [EOS_ID], np.int32) for e in tokenizer.encode_batch(texts)])


def unigram_loss(train: np.ndarray, val: np.ndarray) -> float:
    """Cross-entropy (nats/token) on `val` of token frequencies counted on `train`, add-one
    smoothed: the loss of a model that ignores context."""
    counts = np.bincount(train, minlength=VOCAB_SIZE) + 1.0
    return float(-np.mean(np.log(counts / counts.sum())[val]))


# --- model ------------------------------------------------------------------------------------

def init_params(key: jax.Array, m: Shape = DEFAULT_SHAPE, std: float = 0.02) -> Params:
    """Normal(0, std) weights, unit norms. Projections that write into the residual stream
    start smaller, by 1/sqrt(2 * layers). (The functions below read the shape from these.)"""
    shapes = {"model.embed_tokens.weight": (VOCAB_SIZE, m.hidden)}
    for i in range(m.layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (m.hidden, m.heads * HEAD_DIM),
                   p + "self_attn.k_proj.weight": (m.hidden, m.kv_heads * HEAD_DIM),
                   p + "self_attn.v_proj.weight": (m.hidden, m.kv_heads * HEAD_DIM),
                   p + "self_attn.o_proj.weight": (m.heads * HEAD_DIM, m.hidden),
                   p + "mlp.gate_proj.weight": (m.hidden, m.mlp), p + "mlp.up_proj.weight": (m.hidden, m.mlp),
                   p + "mlp.down_proj.weight": (m.mlp, m.hidden)}
    params = {}
    for (name, shape), k in zip(shapes.items(), jax.random.split(key, len(shapes))):
        scale = std / math.sqrt(2 * m.layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
        params[name] = scale * jax.random.normal(k, shape, jnp.float32)
    norms = [f"model.layers.{i}.{n}.weight" for i in range(m.layers)
             for n in ("input_layernorm", "post_attention_layernorm")] + ["model.norm.weight"]
    return params | {name: jnp.ones(m.hidden, jnp.float32) for name in norms}


def num_layers(params: Params) -> int:
    return sum(name.endswith("input_layernorm.weight") for name in params)


def rms_norm(x: jax.Array, weight: jax.Array) -> jax.Array:
    return weight * (x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + NORM_EPS))


def rotary(x: jax.Array) -> jax.Array:
    """Rotary position embedding in Hugging Face's half-split layout; x: [batch, seq, heads, dim]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / ROPE_THETA ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inv_freq
    cos, sin = (jnp.concatenate([f(angles)] * 2, axis=-1)[:, None, :] for f in (jnp.cos, jnp.sin))
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention(p: Params, prefix: str, x: jax.Array) -> jax.Array:
    """Causal grouped-query attention: query head h reads KV head h // (heads // kv_heads)."""
    batch, seq, _ = x.shape
    heads, kv_heads = p[prefix + "q_proj.weight"].shape[1] // HEAD_DIM, p[prefix + "k_proj.weight"].shape[1] // HEAD_DIM
    group = heads // kv_heads
    q = rotary((x @ p[prefix + "q_proj.weight"]).reshape(batch, seq, heads, HEAD_DIM))
    k = rotary((x @ p[prefix + "k_proj.weight"]).reshape(batch, seq, kv_heads, HEAD_DIM))
    v = (x @ p[prefix + "v_proj.weight"]).reshape(batch, seq, kv_heads, HEAD_DIM)
    q = q.reshape(batch, seq, kv_heads, group, HEAD_DIM)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / math.sqrt(HEAD_DIM)
    causal = jnp.tril(jnp.ones((seq, seq), bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bkgqs,bskd->bqkgd", weights, v).reshape(batch, seq, heads * HEAD_DIM)
    return out @ p[prefix + "o_proj.weight"]


def forward(params: Params, tokens: jax.Array) -> jax.Array:
    """Logits [batch, seq, vocab] of a dense causal Llama: LlamaForCausalLM's function."""
    x = params["model.embed_tokens.weight"][tokens]
    for i in range(num_layers(params)):
        p = f"model.layers.{i}."
        x = x + attention(params, p + "self_attn.", rms_norm(x, params[p + "input_layernorm.weight"]))
        h = rms_norm(x, params[p + "post_attention_layernorm.weight"])
        gated = jax.nn.silu(h @ params[p + "mlp.gate_proj.weight"]) * (h @ params[p + "mlp.up_proj.weight"])
        x = x + gated @ params[p + "mlp.down_proj.weight"]
    return rms_norm(x, params["model.norm.weight"]) @ params["model.embed_tokens.weight"].T  # tied head


def loss_fn(params: Params, windows: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats) over windows [batch, SEQ_LEN + 1]."""
    logits = forward(params, windows[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()


# --- training ---------------------------------------------------------------------------------

def make_optimizer(steps: int) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay to a tenth, gradients clipped by global norm;
    norm weights are not decayed."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, PEAK_LR, warmup_steps=max(1, int(WARMUP_FRACTION * steps)), decay_steps=steps,
        end_value=PEAK_LR / 10)
    decay_mask = lambda params: {name: value.ndim == 2 for name, value in params.items()}  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(CLIP_NORM),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=WEIGHT_DECAY, mask=decay_mask))


def random_windows(stream: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    starts = rng.integers(0, len(stream) - SEQ_LEN - 1, size=BATCH_SIZE)
    return np.stack([stream[s:s + SEQ_LEN + 1] for s in starts])


def validation_windows(stream: np.ndarray) -> np.ndarray:
    """The first VAL_WINDOWS non-overlapping windows of the validation stream (a whole number
    of batches)."""
    count = min(VAL_WINDOWS, len(stream) // (SEQ_LEN + 1)) // BATCH_SIZE * BATCH_SIZE
    return stream[:count * (SEQ_LEN + 1)].reshape(count, SEQ_LEN + 1)


@jax.jit
def _batch_loss(params: Params, windows: jax.Array) -> jax.Array:
    return loss_fn(params, windows)


def evaluate(params: Params, val: np.ndarray) -> float:
    """Mean loss over the validation windows."""
    return float(np.mean([_batch_loss(params, w) for w in np.split(val, len(val) // BATCH_SIZE)]))


def train(params: Params, train_ids: np.ndarray, val: np.ndarray, steps: int) -> tuple[Params, float]:
    """`steps` steps on random windows of the training stream, printing train and validation
    loss as they go. Returns the parameters and the seconds per step after the first (which
    compiles), the evaluations included."""
    optimizer = make_optimizer(steps)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, windows):
        loss, grads = jax.value_and_grad(loss_fn)(params, windows)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(SEED)
    opt_state = optimizer.init(params)
    report_every = max(1, steps // 20)
    recent = []
    start = time.perf_counter()
    for i in range(1, steps + 1):
        params, opt_state, loss = step(params, opt_state, random_windows(train_ids, rng))
        recent.append(loss)
        if i == 1:
            jax.block_until_ready(loss)
            compiled = time.perf_counter()
        if i % report_every == 0 or i == steps:
            line = f"step {i:5d}/{steps}  train {np.mean(recent):.3f}"
            if i % (5 * report_every) == 0 or i == steps:
                line += f"  val {evaluate(params, val):.3f}"
            print(f"{line}  ({time.perf_counter() - start:.0f} s)", flush=True)
            recent = []
    return params, (time.perf_counter() - compiled) / max(1, steps - 1)


def as_bfloat16(params: Params) -> Params:
    """The values a bfloat16 checkpoint holds, kept in float32 (which represents them exactly)."""
    return {name: value.astype(jnp.bfloat16).astype(jnp.float32) for name, value in params.items()}


# --- checkpoint -------------------------------------------------------------------------------

def hf_config(m: Shape):
    """The model's shape as a transformers LlamaConfig."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=m.hidden, intermediate_size=m.mlp,
                       num_hidden_layers=m.layers, num_attention_heads=m.heads, num_key_value_heads=m.kv_heads,
                       head_dim=HEAD_DIM, max_position_embeddings=SEQ_LEN, rms_norm_eps=NORM_EPS,
                       rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
                       tie_word_embeddings=True, bos_token_id=EOS_ID, eos_token_id=EOS_ID)


def save_checkpoint(params: Params, tokenizer: Tokenizer, out: Path, m: Shape) -> None:
    """The model as a bfloat16 Hugging Face checkpoint written by transformers itself, and the
    tokenizer as tokenizer.json + a tokenizer_config.json naming the generic fast tokenizer class,
    which transformers and paged_jax.tokenizer read alike."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    state = {name: torch.from_numpy(np.array(value.T if name.endswith("proj.weight") else value))
             for name, value in params.items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model = LlamaForCausalLM(hf_config(m))
    model.load_state_dict(state, strict=True)
    model.generation_config = GenerationConfig(bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save(str(out / "tokenizer.json"))
    settings = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=EOS, eos_token=EOS, pad_token=EOS,
                    model_max_length=SEQ_LEN)
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def check_against_hf(params: Params, out: Path, windows: np.ndarray) -> float:
    """Max |our logits - HF's| on `windows`, HF reading the saved checkpoint in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(windows).long()).logits.numpy()
    return float(np.abs(np.asarray(forward(params, jnp.asarray(windows))) - theirs).max())


def greedy_samples(out: Path) -> dict[str, str]:
    """HF's greedy continuation of each of PROMPTS, from the saved files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    samples = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        generated = model.generate(**ids, do_sample=False, max_new_tokens=SAMPLE_TOKENS)
        samples[prompt] = tokenizer.decode(generated[0, ids["input_ids"].shape[1]:])
    return samples


def write_model_card(out: Path, facts: dict, m: Shape) -> None:
    samples = "\n\n".join(f"`{prompt!r}` ->\n\n```python\n{prompt}{text}\n```"
                          for prompt, text in facts["samples"].items())
    role = "The embedded default model of paged-jax" if m == DEFAULT_SHAPE else \
        "The draft model of paged-jax's embedded default model (speculative decoding; its tokenizer)"
    (out / "README.md").write_text(f"""# {out.name}

{role}: a Llama of {facts['parameters'] / 1e6:.2f}M parameters
that writes Python, trained from scratch on the Python standard library's source. Load it with
`LLM("models/{out.name}")` or `transformers.AutoModelForCausalLM.from_pretrained("models/{out.name}")`.

- Shape: hidden {m.hidden}, {m.layers} layers, {m.heads} query and {m.kv_heads} KV heads of {HEAD_DIM}, MLP {m.mlp},
  tied embeddings, context {SEQ_LEN} tokens; weights stored in bfloat16.
- Corpus: the `.py` files of the Python {platform.python_version()} standard library, skipping
  {", ".join(sorted(SKIPPED_DIRS))}: {facts['train_files']} files ({facts['train_tokens']:,} tokens) for
  training, every {VAL_EVERY}th file ({facts['val_files']} files, {facts['val_tokens']:,} tokens) held out.
- Tokenizer: byte-level BPE of {VOCAB_SIZE} tokens trained on the training files; `{EOS}` (id {EOS_ID})
  ends each file and is both BOS and EOS; nothing is added to prompts.
- Training: {facts['steps']} steps of {BATCH_SIZE} x {SEQ_LEN} tokens (seed {SEED}) in float32, AdamW (peak
  learning rate {PEAK_LR}, {WARMUP_FRACTION:.0%} linear warm-up, cosine decay to a tenth, weight decay
  {WEIGHT_DECAY}), gradients clipped at norm {CLIP_NORM}; {facts['seconds_per_step']:.2f} s per step,
  {facts['minutes']:.1f} minutes for the whole script.
- Validation loss of the saved weights: {facts['val_loss']:.3f} nats/token (a unigram model: {facts['unigram']:.3f}).
- Hugging Face's float32 logits on the saved files equal the training code's to within
  {facts['max_abs_diff']:.1e}.
- Made by `{facts['command']}` on {facts['date']}, {facts['machine']}; JAX {jax.__version__},
  optax {optax.__version__}.

Greedy continuations ({SAMPLE_TOKENS} new tokens, Hugging Face `generate`):

{samples}
""")


# --- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps")
    parser.add_argument("--out", type=Path, default=None, help="checkpoint directory")
    parser.add_argument("--draft", action="store_true", help="the default model's draft model (speculative decoding)")
    args = parser.parse_args(argv)
    m = DRAFT_SHAPE if args.draft else DEFAULT_SHAPE
    args.out = args.out or (DRAFT_OUT if args.draft else DEFAULT_OUT)
    began = time.perf_counter()

    train_texts, val_texts = split_corpus(stdlib_sources(Path(sysconfig.get_paths()["stdlib"])))
    tokenizer = Tokenizer.from_file(str(DEFAULT_OUT / "tokenizer.json")) if args.draft else train_tokenizer(train_texts)
    train_ids, val_ids = token_stream(tokenizer, train_texts), token_stream(tokenizer, val_texts)
    val = validation_windows(val_ids)
    unigram = unigram_loss(train_ids, val[:, 1:].ravel())
    print(f"corpus: {len(train_texts)} train files, {len(train_ids):,} tokens; {len(val_texts)} validation "
          f"files, {len(val_ids):,} tokens; a unigram model's validation loss: {unigram:.3f}", flush=True)

    params = init_params(jax.random.key(SEED), m)
    parameters = sum(p.size for p in params.values())
    print(f"model: {parameters / 1e6:.2f}M parameters; {args.steps} steps of {BATCH_SIZE} x {SEQ_LEN} tokens",
          flush=True)
    params, seconds_per_step = train(params, train_ids, val, args.steps)
    params = as_bfloat16(params)
    val_loss = evaluate(params, val)

    args.out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(params, tokenizer, args.out, m)
    max_abs_diff = check_against_hf(params, args.out, val[:2, :-1])
    samples = greedy_samples(args.out)
    print(f"saved weights (bfloat16): val {val_loss:.3f}; HF vs ours: max |logits diff| = {max_abs_diff:.1e}")
    for prompt, text in samples.items():
        print(f"--- {prompt!r}\n{prompt}{text}")
    minutes = (time.perf_counter() - began) / 60
    write_model_card(args.out, dict(
        parameters=parameters, train_files=len(train_texts), val_files=len(val_texts),
        train_tokens=len(train_ids), val_tokens=len(val_ids), steps=args.steps,
        seconds_per_step=seconds_per_step, minutes=minutes, val_loss=val_loss, unigram=unigram,
        max_abs_diff=max_abs_diff, samples=samples, date=datetime.date.today().isoformat(),
        command=" ".join(["python -m experiments.train_default_model", *sys.argv[1:]]), machine=device_kind()), m)
    print(f"saved to {args.out} in {minutes:.1f} minutes ({seconds_per_step:.2f} s per step)")


if __name__ == "__main__":
    main()
