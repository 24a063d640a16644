"""The PyTorch peer of the GPU check: build-nanogpt's GPT-2 in PyTorch, timed on the same shapes as ours.

    python scripts/gpu/torch_peer.py --model gpt2 --micro-batch 64 [--optimizer adamw muon] [--steps 10]
                                     [--warmup 3] [--no-compile] [--peak-tflops X] [--json OUT]
    python scripts/gpu/torch_peer.py --smoke     # tiny shapes, on CPU if there is no GPU (the test's mode)

The model is build-nanogpt's (karpathy/build-nanogpt, train_gpt2.py), written here from its
description, at the shape of our GPTConfig preset (gpt2: 12 x 768, 12 heads; fgpt: 32 x 1248, 24 heads):
learned positions, pre-LayerNorm blocks (eps 1e-5), GELU (tanh), 4x MLP, the LM head tied to the token
embedding, vocabulary 50,304, init N(0, 0.02) with the residual projections at 0.02 / sqrt(2 L), and
causal `F.scaled_dot_product_attention` (PyTorch picks flash / cuDNN / memory-efficient). Its parameter
count is checked against `GPTConfig.num_params()` before anything runs. One training step: bf16
autocast forward, float32 logits and cross-entropy, backward, global-norm clipping at 1.0, the optimizer:
  adamw  torch.optim.AdamW(fused), the gpt2_124m preset's lr, betas, eps and weight decay 0.1 on 2-D
         parameters only (build-nanogpt's configure_optimizers; our weight_decay_on="matrices")
  muon   torch.optim.Muon on the hidden matrices (attention qkv and projection, MLP in and out: the
         parameters fgpt_jax/optim.py labels "muon") with gpt2_124m_muon's lr, momentum and weight decay,
         and fused AdamW as above on the rest (embeddings, LayerNorms, biases)
The model is compiled once with torch.compile (the optimizer rows reuse it: same shapes), on random
tokens already on the device; the first step (compilation included) is timed apart, then --warmup
steps, then --steps steps with one synchronisation at the end. tokens/s = steps x micro-batch x T / time;
MFU uses our FLOPs per token (`GPTConfig.flops_per_token`, the PaLM convention) over the device's dense
bf16 peak from fgpt_jax/metrics.py's table (or --peak-tflops), so the ratio to fgpt-jax is apples to
apples. Prints a markdown table; --json writes the rows after every row.

Why hand-written: no maintained package ships build-nanogpt's model as a library; it is ~100 lines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMOKE_SHAPE = {  # the check's stand-ins (sections.py SMOKE_MODEL): FGPT's keeps head_dim 52
    "gpt2": dict(n_layer=1, n_embd=64, n_head=2, block_size=32),
    "fgpt": dict(n_layer=1, n_embd=104, n_head=2, block_size=32),
}
PRESET = {"gpt2": ("gpt2", "gpt2_124m", "gpt2_124m_muon"), "fgpt": ("fgpt", "fgpt", "fgpt")}


def build_model(cfg):
    """build-nanogpt's GPT at the shape of `cfg` (a GPTConfig). Returns a torch.nn.Module whose
    forward(idx, targets) is the mean cross-entropy in float32."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    D, N, L, V, T, bias = cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.vocab_size, cfg.block_size, cfg.bias

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(D, 3 * D, bias=bias)
            self.c_proj = nn.Linear(D, D, bias=bias)
            self.c_proj.residual = True

        def forward(self, x):
            B, T_, _ = x.shape
            q, k, v = self.c_attn(x).split(D, dim=2)
            q, k, v = (t.view(B, T_, N, D // N).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).reshape(B, T_, D))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(D, 4 * D, bias=bias)
            self.c_proj = nn.Linear(4 * D, D, bias=bias)
            self.c_proj.residual = True

        def forward(self, x):
            return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(D, eps=1e-5, bias=bias)
            self.attn = SelfAttention()
            self.ln_2 = nn.LayerNorm(D, eps=1e-5, bias=bias)
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(V, D)
            self.wpe = nn.Embedding(T, D)
            self.h = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(D, eps=1e-5, bias=bias)
            self.lm_head = nn.Linear(D, V, bias=False)
            self.lm_head.weight = self.wte.weight  # tied, as in GPT-2 (counted once in parameters())

        def forward(self, idx, targets):
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = self.wte(idx) + self.wpe(pos)
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x)).float()  # float32 logits and loss, as ours
            return F.cross_entropy(logits.view(-1, V), targets.reshape(-1))

    model = GPT()
    init_weights(model, L)
    return model


def init_weights(model, n_layer: int) -> None:
    """build-nanogpt's init: N(0, 0.02) for Linear and Embedding weights, residual projections scaled by
    1/sqrt(2 n_layer), zero biases (LayerNorms stay at 1 and 0)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            std = 0.02 / math.sqrt(2 * n_layer) if getattr(m, "residual", False) else 0.02
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def hidden_matrices(model) -> list[str]:
    """Names of the parameters fgpt_jax/optim.py gives to Muon: attention qkv and projection, MLP in and out."""
    ends = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    return [n for n, _ in model.named_parameters() if n.endswith(ends)]


def make_optimizers(model, name: str, optim, fused: bool) -> list:
    """[torch.optim.AdamW] or [torch.optim.Muon, torch.optim.AdamW] with `optim` (our OptimConfig)'s
    hyperparameters, split as fgpt_jax/optim.py splits the parameters."""
    import torch

    params = dict(model.named_parameters())
    muon_names = set(hidden_matrices(model)) if name == "muon" else set()
    rest = [(n, p) for n, p in params.items() if n not in muon_names]
    decay_all = optim.weight_decay_on == "all"
    groups = [
        {"params": [p for n, p in rest if p.ndim >= 2 or decay_all], "weight_decay": optim.weight_decay},
        {"params": [p for n, p in rest if not (p.ndim >= 2 or decay_all)], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=fused
    )
    if name != "muon":
        return [adamw]
    muon = torch.optim.Muon(
        [params[n] for n in params if n in muon_names],
        lr=optim.muon_lr,
        momentum=optim.muon_momentum,
        weight_decay=optim.muon_weight_decay,
        nesterov=True,
        ns_steps=optim.ns_steps,
    )
    return [muon, adamw]


def device_peak(device_name: str, override_tflops: float | None) -> float | None:
    """Dense bf16 FLOP/s of the device: --peak-tflops, else fgpt_jax/metrics.py's table (as for our rows)."""
    if override_tflops:
        return override_tflops * 1e12
    from fgpt_jax.metrics import PEAK_BF16_TFLOPS

    return next((t * 1e12 for name, t in PEAK_BF16_TFLOPS if name in device_name), None)


def bench(args) -> dict:
    import torch

    from fgpt_jax.config import load_config
    from fgpt_jax.model import GPTConfig

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    preset, adamw_cfg, muon_cfg = PRESET[args.model]
    cfg = GPTConfig.preset(preset, **(SMOKE_SHAPE[args.model] if args.smoke else {}))
    T = cfg.block_size
    model = build_model(cfg).to(dev)
    n = sum(p.numel() for p in model.parameters())
    if n != cfg.num_params():
        raise SystemExit(f"error: torch model has {n:,} parameters, GPTConfig.num_params() {cfg.num_params():,}")
    torch.set_float32_matmul_precision("high")  # TF32 for any float32 matmul left (build-nanogpt does this)
    compiled = torch.compile(model) if args.compile else model
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (args.micro_batch, T + 1), generator=gen).to(dev)
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = device_peak(name, args.peak_tflops) if cuda else None
    fpt = cfg.flops_per_token(T)
    header = {
        "device": name,
        "torch": torch.__version__,
        "model": args.model,
        "params": n,
        "seq_len": T,
        "micro_batch": args.micro_batch,
        "flops_per_token": fpt,
        "peak_flops": peak,
        "compile": args.compile,
        "attention": "F.scaled_dot_product_attention(is_causal=True)"
        + (
            f" (enabled: flash {torch.backends.cuda.flash_sdp_enabled()}, "
            f"cuDNN {torch.backends.cuda.cudnn_sdp_enabled()}"
            f", mem-efficient {torch.backends.cuda.mem_efficient_sdp_enabled()})"
            if cuda
            else " (CPU)"
        ),
    }

    def sync():
        if cuda:
            torch.cuda.synchronize()

    rows = []
    print(
        f"torch {torch.__version__}, {name}, {args.model} ({n / 1e6:.1f}M params), T={T}, micro-batch "
        f"{args.micro_batch}, compile {args.compile}; MFU: {fpt / 1e6:.0f} MFLOP/token over "
        f"{'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}"
    )
    print(
        "| optimizer | first step s | step ms | tokens/s | MFU | peak GB | loss |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    for opt_name in args.optimizer:
        optim = load_config(muon_cfg if opt_name == "muon" else adamw_cfg).optim
        init_weights(model, cfg.n_layer)
        opts = make_optimizers(model, opt_name, optim, fused=cuda or args.smoke)
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def step(opts=opts):  # bound now: `del opts` below frees them before the next row
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = compiled(inputs, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            for o in opts:
                o.step()
            for o in opts:
                o.zero_grad(set_to_none=True)
            return loss

        row = {"optimizer": opt_name, "micro_batch": args.micro_batch}
        try:
            t0 = time.perf_counter()
            step()
            sync()
            row["first_step_s"] = time.perf_counter() - t0  # compilation (once per process) and the first step
            for _ in range(args.warmup):
                step()
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss = step()
            sync()
            dt = time.perf_counter() - t0
            tps = args.steps * args.micro_batch * T / dt
            row.update(
                step_ms=1000 * dt / args.steps,
                tokens_per_sec=tps,
                mfu=tps * fpt / peak if peak else None,
                peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                loss=float(loss.detach()),
            )
        except Exception as e:  # e.g. out of memory: report it, try the next optimizer
            row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        rows.append(row)
        print(markdown_row(row), flush=True)
        if args.json:
            tmp = f"{args.json}.tmp"
            with open(tmp, "w") as f:
                json.dump({**header, "rows": rows}, f, indent=1)
            os.replace(tmp, args.json)
        del opts
    return {**header, "rows": rows}


def markdown_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['optimizer']} | {r['error']} | | | | | |"
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    return (
        f"| {r['optimizer']} | {r['first_step_s']:.1f} | {r['step_ms']:.1f} | {r['tokens_per_sec']:,.0f} | "
        f"{fmt(r['mfu'], '.1%')} | {fmt(r['peak_mem_gb'], '.1f')} | {r['loss']:.4f} |"
    )


def parser() -> argparse.ArgumentParser:
    from fgpt_jax import cli

    p = cli.Parser(prog="python scripts/gpu/torch_peer.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(PRESET), default="gpt2", help="the preset's shape (default gpt2)")
    p.add_argument("--micro-batch", type=cli.positive_int, default=16, help="sequences per step (default 16)")
    p.add_argument("--optimizer", nargs="+", choices=["adamw", "muon"], default=["adamw", "muon"])
    p.add_argument("--steps", type=cli.positive_int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=cli.int_in(0), default=3, help="untimed steps after the first (default 3)")
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default: on; off with --smoke)"
    )
    p.add_argument("--peak-tflops", type=cli.float_in(0, lo_open=True), help="the device's dense bf16 peak for MFU")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (sections.py's stand-ins), 2 steps")
    p.add_argument("--json", metavar="FILE", help="write the rows to this file (after every row)")
    return p


def main(argv=None) -> int:
    sys.path.append(str(ROOT))  # fgpt_jax from this checkout when it is not installed (or staged by check.py)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # fgpt_jax's config code imports JAX: keep it off the GPU
    from fgpt_jax import cli

    args = parser().parse_args(argv)
    if args.compile is None:
        args.compile = not args.smoke
    if args.smoke:
        args.steps, args.warmup, args.micro_batch = min(args.steps, 2), min(args.warmup, 1), min(args.micro_batch, 2)

    def body() -> int:
        bench(args)
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
