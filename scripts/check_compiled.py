"""Every method on its Triton path, eager and under torch.compile, against the unpatched model.

    python scripts/check_compiled.py [--device cuda] [--length 1024] [--out results/check_compiled.json]

A random-weight Llama (4 layers, 8 query / 2 KV heads, head dim 64; correctness only, no quality or
speed claim) runs a left-padded batch: the patched model's logits against SDPA's, compiled against
eager (logits and the loss gradient of the first q_proj in training mode for longlora, moh and seer
distillation's trainable gates), and a patched deep copy removed on its own. Prints a table; exits
non-zero when a check fails.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

import attn_patch

METHODS = {
    "flash": {},
    "seer": dict(gates="untrained", density=1.0, min_length=0),
    "seer-sparse": dict(gates="untrained", density=0.3, min_length=0, dense_last=0),
    "longlora": dict(group=0.25),
    "longlora-s2": dict(group=0.25, inference="s2"),
    "moh": dict(active=1.0),
    "moh-0.5": dict(active=0.5),
}
# what equals the unpatched model exactly (up to bf16 rounding)
DENSE = {"flash", "seer", "longlora", "moh"}


def build(device, dtype, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=64, num_hidden_layers=4, max_position_embeddings=8192,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg).to(device, dtype).eval()


def batch(length, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1024, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, : length // 3] = 0  # left padding on the second row
    return ids.to(device), mask.to(device)


def rel(a, b, keep):
    a, b = a[keep].double(), b[keep].double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def grad_of(model, ids, mask, fn):
    model.train()
    model.zero_grad(set_to_none=True)
    out = fn(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    g = model.model.layers[0].self_attn.q_proj.weight.grad.detach().clone()
    model.eval()
    return g


def check(name, options, device, dtype, length, compile_backend="inductor", backend="auto") -> dict:
    model = build(device, dtype)
    ids, mask = batch(length, device)
    keep = mask.bool()
    with torch.no_grad():
        sdpa = model(input_ids=ids, attention_mask=mask).logits
    method = name.split("-")[0]
    attn_patch.apply(model, method, backend=backend, **options)
    row = {"method": name}
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask).logits
        compiled_model = torch.compile(model, backend=compile_backend)
        compiled = compiled_model(input_ids=ids, attention_mask=mask).logits
    row["eager_vs_sdpa"] = rel(eager, sdpa, keep)
    row["compiled_vs_eager"] = rel(compiled, eager, keep)
    if method in ("longlora", "moh"):
        g_eager = grad_of(model, ids, mask, model)
        g_comp = grad_of(model, ids, mask, torch.compile(model, backend=compile_backend))
        row["grad_compiled_vs_eager"] = ((g_comp - g_eager).double().norm() / g_eager.double().norm()).item()
    twin = copy.deepcopy(model)
    attn_patch.remove(twin)
    with torch.no_grad():
        again = model(input_ids=ids, attention_mask=mask).logits
        plain = twin(input_ids=ids, attention_mask=mask).logits
    row["copy_removed_original_still_patched"] = rel(again, eager, keep)
    row["removed_copy_vs_sdpa"] = rel(plain, sdpa, keep)
    tol = {torch.bfloat16: 2e-2, torch.float16: 5e-3}.get(dtype, 1e-4)
    row["ok"] = (row["compiled_vs_eager"] < tol and row["copy_removed_original_still_patched"] < 1e-6
                 and row["removed_copy_vs_sdpa"] < 1e-6 and row.get("grad_compiled_vs_eager", 0.0) < 5 * tol
                 and (name not in DENSE or row["eager_vs_sdpa"] < tol))
    attn_patch.remove(model)
    torch._dynamo.reset()
    return row


def main(argv=None) -> int:
    from attn_patch.evals.common import HelpFormatter

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--device", default="cuda", help="torch device")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="model dtype")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                        help="the methods' backend ('triton' runs float32 on the kernels with IEEE dots)")
    parser.add_argument("--length", type=int, default=1024, help="tokens per row of the batch of two")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS),
                        help="which method settings to check")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--out", help="write the rows as JSON here (default: print only)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = [check(name, METHODS[name], args.device, dtype, args.length, args.compile_backend, args.backend)
            for name in args.methods]
    cols = ["method", "eager_vs_sdpa", "compiled_vs_eager", "grad_compiled_vs_eager",
            "copy_removed_original_still_patched", "removed_copy_vs_sdpa", "ok"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.2e}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols))
    env = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "transformers": __import__("transformers").__version__,
           "length": args.length, "dtype": args.dtype, "compile_backend": args.compile_backend,
           "backend": args.backend, "model": "random-weight llama, 4 layers, 8/2 heads, d=64"}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=2)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
