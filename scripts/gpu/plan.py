"""The GPU check's plans (sections, their order, their GPU budgets) and the micro-batch memory estimate.

Nothing here touches a device: check.py prints the plan before any device time is spent, and the env
probe (probe.py, on the device) calls `choose_micro_batch` with the memory JAX may use there.

Budgets are seconds of GPU time per section on one H100/H200, written down from the sources in
scripts/gpu/README.md ("Where each budget comes from"); the headline plan's add up to 480 s, so it is
known to fit one 10-minute device call before the call is made. A section may use what the ones
before it left unused (its deadline is the running total of the budgets); past that it is stopped
and reported as cut, and a section that no longer has its minimum left is reported as not run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    key: str  # the sections.py function that runs it (section_<key>)
    title: str  # the report's heading
    budget_s: int  # planned GPU seconds (scripts/gpu/README.md says where each comes from)
    min_s: int  # below this much time left it is not started: it could not produce a number


HEADLINE = (
    Section("env", "(a) Environment and cuDNN attention self-test", 35, 15),
    Section("gpt2", "(b) GPT-2 124M throughput: AdamW, then Muon", 120, 50),
    Section("peer", "(c) PyTorch peer (torch.compile) at the same shape", 95, 40),
    Section("run", "(d) Real run: train CLI, checkpoint, HellaSwag, decode", 150, 60),
    Section("fgpt", "(e) FGPT 662.7M throughput, scan over layers", 80, 45),
)
MORE = (
    Section("env", "Environment and cuDNN attention self-test", 20, 10),
    Section("gpt2_sweep", "GPT-2 124M micro-batch sweep: AdamW and Muon", 150, 50),
    Section("peer_sweep", "PyTorch peer at the sweep's micro-batches", 120, 40),
    Section("fgpt_sweep", "FGPT micro-batch sweep: scan, scan + remat", 150, 60),
    Section("variants", "Step-speed variants against their base", 200, 60),
    Section("flags", "XLA/JAX settings", 150, 50),
    Section("numerics", "Numerics: bf16 vs float32, head_dim padding 56 vs 64", 60, 30),
    Section("optim", "Muon vs AdamW: tokens to AdamW's final validation loss", 240, 120),
)
PLANS = {"headline": HEADLINE, "more": MORE}
PLAN_HELP = {
    "headline": "one 10-minute call: the numbers a user asks for first (sections (a)-(e))",
    "more": "a second, optional call: sweeps, step-speed variants, XLA flags, numerics, Muon vs AdamW",
}


def total_budget(plan: str) -> int:
    return sum(s.budget_s for s in PLANS[plan])


def format_plan(plan: str, budget: int, smoke: bool) -> list[str]:
    """The plan as the report's first table: order, section, GPU budget, planned start and end."""
    lines = [
        f"Plan `{plan}`: {PLAN_HELP[plan]}. GPU budget {total_budget(plan)} s in all; this call's --budget {budget} s"
        + (" (smoke: tiny shapes on CPU; the budgets are the GPU plan's and are not enforced)." if smoke else "."),
        "",
        "| # | section | GPU budget s | planned from s | to s |",
        "|---:|---|---:|---:|---:|",
    ]
    t = 0
    for i, s in enumerate(PLANS[plan], 1):
        lines.append(f"| {i} | {s.title} | {s.budget_s} | {t} | {t + s.budget_s} |")
        t += s.budget_s
    return lines


# -- the micro-batch from a memory estimate ------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of device memory one train step holds at its peak, by part."""

    params: int  # float32 parameters
    grads: int  # float32 gradients (and the accumulation buffer with grad_accum > 1)
    optimizer: int  # AdamW moments / Muon momentum, float32
    compute_copies: int  # the bf16 casts of the weights the matmuls read, kept for the backward pass
    activations: int  # what the forward pass keeps for the backward pass, in the compute dtype
    logits: int  # the float32 logits of the LM head, their gradient and its cast to the compute dtype

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.compute_copies + self.activations + self.logits


def _muon_params(model) -> int:
    """Parameters of the hidden matrices (attention qkv and projection, MLP in and out kernels): the ones
    fgpt_jax/optim.py gives to Muon."""
    D = model.n_embd
    return model.n_layer * (3 * D * D + D * D + 4 * D * D + 4 * D * D)


def compute_bytes(model) -> int:
    """Bytes per value of the compute dtype (bf16 on GPU; float32 in the CPU tests)."""
    return 2 if model.dtype in ("bfloat16", "float16") else 4


def activation_bytes_per_token_layer(model, attention: str = "cudnn", seq_len: int | None = None) -> int:
    """What one block keeps for its backward pass per token, in bytes (compute dtype bf16: 2 per value).

    Itemised after Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    Models", section 4.1: 34·D bytes per token and layer plus 5·N·T for the attention scores in fp16
    with dropout), without dropout masks (GPT-2 pretraining here uses none):
      LN1 in, LN1 out (qkv's input), q k v, attention out (c_proj's input)   (1 + 1 + 3 + 1) D
      LN2 in, LN2 out (c_fc's input), GELU in, GELU out                      (1 + 1 + 4 + 4) D
    = 16 D values, plus float32 mean and 1/std of both LayerNorms (16 bytes). cuDNN's fused
    attention keeps only a float32 log-sum-exp per head (4 N bytes), and with head_dim padding (FGPT's
    52 -> 56) its q, k, v and output are kept padded. XLA's attention also keeps the T x T probabilities
    per head (compute dtype) and the float32 scores the softmax backward reads.
    """
    D, N = model.n_embd, model.n_head
    H = D // N
    c = compute_bytes(model)
    P = -(-H // model.attention_pad) * model.attention_pad if attention == "cudnn" else H
    b = c * (16 * D + 4 * N * (P - H)) + 16  # padded q, k, v, out: 4 N (P - H) more values
    if attention == "cudnn":
        return b + 4 * N
    return b + (c + 4) * N * (seq_len or model.block_size)


def train_memory(
    model,
    micro_batch: int,
    seq_len: int | None = None,
    optimizer: str = "adamw",
    attention: str = "cudnn",
    grad_accum: int = 1,
) -> MemoryEstimate:
    """The memory of one jitted train step of `model` (a GPTConfig) at `micro_batch` x `seq_len` tokens.

    Parameters, gradients and optimizer state are float32 (the trainer's); activations are in the compute
    dtype (bf16) and follow `activation_bytes_per_token_layer`; `model.remat` keeps only each block's
    input (D values per layer and token) plus one block's activations; `model.loss_chunk` > 0 holds the
    logits of one chunk of positions at a time. This is the estimate the check picks its micro-batch
    from (no sweep); tests/test_gpu_check.py compares it with XLA's own accounting of the compiled step.
    """
    T = seq_len or model.block_size
    P = model.num_params()
    muon = _muon_params(model) if optimizer == "muon" else 0
    tokens = micro_batch * T
    per_layer = activation_bytes_per_token_layer(model, attention, T)
    c = compute_bytes(model)
    # The backward pass of a block holds that block's gradients beside what is kept: one block's worth
    # more (with remat, also the block recomputed).
    if model.remat:
        act = tokens * (model.n_layer * c * model.n_embd + 2 * per_layer)
    else:
        act = tokens * (model.n_layer + 1) * per_layer
    act += tokens * 2 * c * model.n_embd  # the embedding sum and the final LayerNorm's output
    V = model.vocab_size
    logit_tokens = micro_batch * (min(model.loss_chunk, T) if model.loss_chunk else T)
    return MemoryEstimate(
        params=4 * P,
        grads=4 * P * (2 if grad_accum > 1 else 1),
        optimizer=4 * muon + 8 * (P - muon),
        compute_copies=(c if c < 4 else 0) * P,
        activations=act,
        logits=logit_tokens * V * (4 + 4 + (c if c < 4 else 0)),
    )


MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)  # powers of two: the presets' batches divide by them
HEADROOM = 0.8  # of the memory JAX may use: XLA's temporaries, fragmentation, cuBLAS/cuDNN workspaces


def choose_micro_batch(
    model,
    device_bytes: int,
    seq_len: int | None = None,
    optimizer: str = "adamw",
    attention: str = "cudnn",
    largest: int = 64,
) -> tuple[int, MemoryEstimate]:
    """The largest micro-batch in MICRO_BATCHES (up to `largest`: build-nanogpt's 64 for GPT-2) whose
    estimate fits HEADROOM of `device_bytes` (what JAX may allocate: its bytes_limit), and its estimate.
    1 if none fits (the step may still run: the estimate is conservative)."""
    best = 1
    for mb in MICRO_BATCHES:
        if mb <= largest and train_memory(model, mb, seq_len, optimizer, attention).total <= HEADROOM * device_bytes:
            best = mb
    return best, train_memory(model, best, seq_len, optimizer, attention)
