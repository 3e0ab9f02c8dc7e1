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
