"""CUDA correctness: absorbed vs expanded attention (fp32 and bf16), cached vs full decoding."""
import torch

import mea
from mea.ops import absorbed_attention, absorbed_attention_reference

dev = torch.device("cuda")
torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
    q = torch.randn(2, 1, 32, 64, device=dev, dtype=dtype)
    k = torch.randn(2, 4096, 4, 64, device=dev, dtype=dtype)
    v = torch.randn(2, 4096, 4, 64, device=dev, dtype=dtype)
    wk, wv = torch.randn(4, 8, device=dev, dtype=dtype), torch.randn(4, 8, device=dev, dtype=dtype)
    out = absorbed_attention(q, k, v, wk, wv, mask=None, scale=0.125).float()
    ref = absorbed_attention_reference(q.cpu().float(), k.cpu().float(), v.cpu().float(), wk.cpu().float(),
                                       wv.cpu().float(), mask=None, scale=0.125).to(dev)
    err = ((out - ref).norm() / ref.norm()).item()
    print(f"absorbed vs reference {dtype}: rel err {err:.2e}", "OK" if err < tol else "FAIL")
cfg = mea.make_config("tiny", mea_num_component_heads=[1, 2], vocab_size=97)
model = mea.MEAForCausalLM(cfg).to(dev).eval()
ids = torch.randint(1, 97, (3, 12), device=dev)
mask = torch.ones_like(ids)
mask[1, :4] = 0
mask[2, :7] = 0
with torch.no_grad():
    full = model(ids, attention_mask=mask).logits
    out = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
    steps = [out.logits]
    for t in range(6, 12):
        out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=out.cache)
        steps.append(out.logits)
inc = torch.cat(steps, 1)
err = (inc[mask.bool()] - full[mask.bool()]).abs().max().item()
print(f"cached vs full decoding on cuda (batch 3, left padding): max abs err {err:.2e}", "OK" if err < 1e-3 else "FAIL")

# bf16 on the GPU, compressed layers with and without QK-norm: cached decoding (left padding, batch 3) against
# the full forward, eager attention against the fused kernels, and no host-device synchronisation per step
for name, overrides in {"h'<h": dict(mea_num_component_heads=[1, 2]),
                        "h'<h+qknorm": dict(mea_num_component_heads=1, use_qk_norm=True),
                        "h'=h+qknorm": dict(use_qk_norm=True)}.items():
    cfg = mea.make_config("tiny", vocab_size=97, **overrides)
    torch.manual_seed(0)
    fp32 = mea.MEAForCausalLM(cfg).eval()
    with torch.no_grad():  # move norms and HLC off their identity inits
        for pname, p in fp32.named_parameters():
            if pname.endswith("norm.weight") or ".hlc_" in pname:
                p.add_(0.3 * torch.randn_like(p))
    model = mea.MEAForCausalLM._from_config(cfg).to(dev, torch.bfloat16).eval()
    model.load_state_dict(fp32.state_dict())
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits.float()
        out = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        steps = [out.logits.float()]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host-device sync in a decoding step raises
        try:
            for t in range(6, 12):
                out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=out.cache)
                steps.append(out.logits)
            synced = "no sync"
        except RuntimeError as e:
            synced = f"SYNC: {e}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        inc = torch.cat([s.float() for s in steps], 1)
        real = mask.bool()
        err = ((inc[real] - full[real]).norm() / full[real].norm()).item()
        print(f"{name} bf16 cached vs full (batch 3, left padding): rel err {err:.2e}",
              "OK" if err < 3e-2 else "FAIL", f"| decode steps: {synced}", "OK" if synced == "no sync" else "FAIL")
        model.set_attn_implementation("eager")
        eager = model(ids, attention_mask=mask, output_attentions=True)
        err = ((eager.logits.float()[real] - full[real]).norm() / full[real].norm()).item()
        sums = torch.stack([a.float().sum(-1) for a in eager.attentions])  # (L, B, N, T)
        ok = (sums.transpose(2, 3)[:, real] - 1).abs().max().item()
        print(f"{name} bf16 eager vs sdpa: rel err {err:.2e}", "OK" if err < 3e-2 else "FAIL",
              f"| attention rows sum to 1 within {ok:.1e}", "OK" if ok < 1e-2 else "FAIL")
