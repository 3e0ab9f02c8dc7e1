"""The vLLM plugin against `mea`'s own generate, on tiny random checkpoints; and a server smoke test.

Runs only in the serving environment (`make serve-check`); the reference side runs in the main environment
($MEA_MAIN_PYTHON, default .venv/bin/python), since MEA's transformers model needs transformers >= 5.24.
Marked slow: each engine start takes tens of seconds on a small CPU.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="needs the serving environment: make serve-env, then make serve-check")

from mea.models import MEAConfig, MEAForCausalLM  # noqa: E402
from mea.serving import check  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MAIN_PYTHON = os.environ.get("MEA_MAIN_PYTHON", str(ROOT / ".venv" / "bin" / "python"))

BASE = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=512, mea_head_norm=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
MODELS = {
    # h' per layer: plain GQA (HLC folded), h'=1, and keys narrower than values (padded to one width)
    "head": dict(mea_num_key_components=[2, 1, 1], mea_num_value_components=[2, 1, 2], attention_bias=True),
    # RoPE-exact per-pair keys and a value latent of another width per layer
    "rope-pair-latent": dict(mea_key_mixing="rope_pair", mea_value_mixing="latent",
                             mea_num_key_components=[1, 2, 1], mea_value_latent_dim=[64, 32, 48]),
}


def save_tiny(root: Path, name: str) -> Path:
    torch.manual_seed(0)
    model = MEAForCausalLM(MEAConfig(**BASE, **MODELS[name]))
    with torch.no_grad():  # move every weight off its init so that no mapping error can pass unseen
        for pname, p in model.named_parameters():
            if ".hlc_" in pname or pname.endswith(".bias"):
                p.normal_()
            elif pname.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(root / name)
    return root / name


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    return [str(save_tiny(root, name)) for name in MODELS]


def test_vllm_greedy_equals_mea_generate(tiny_models):
    if not Path(MAIN_PYTHON).is_file():
        pytest.skip(f"no main environment at {MAIN_PYTHON} (make setup, or set MEA_MAIN_PYTHON)")
    results = check.equality(tiny_models, MAIN_PYTHON, new_tokens=12)
    for model, res in results.items():
        assert res["tokens_equal"], (model, res)
        assert res["max_abs_logprob_diff"] <= check.LOGPROB_TOLERANCE, (model, res)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _word_tokenizer(model_dir: Path, vocab: int) -> None:
    """A word-level tokenizer over the tiny vocabulary and a chat template, so the server takes text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 1)} | {"<unk>": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(model_dir)


def test_server_answers_a_chat_request(tiny_models, tmp_path):
    model = Path(tiny_models[0])
    _word_tokenizer(model, BASE["vocab_size"])
    port = _free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "mea", "serve", str(model), "--port", str(port), "--dtype",
                                   "float32", "--kv-cache-gib", "0.0625", "--max-model-len", "256",
                                   "--python", sys.executable], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, f"the server exited while starting:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=5) as r:
                    served = [m["id"] for m in json.load(r)["data"]]
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start within 10 minutes"
                time.sleep(3)
        assert served == [model.name]
        for _ in range(2):  # a bounded number of requests
            body = {"model": model.name, "messages": [{"role": "user", "content": "w1 w2 w3 w4"}],
                    "max_tokens": 5, "temperature": 0}
            req = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                answer = json.load(r)
            assert answer["usage"]["completion_tokens"] == 5
            assert answer["choices"][0]["message"]["role"] == "assistant"
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
