"""MQAR: the data are what they claim, and a small model learns to recall from them."""

import torch

from mea.eval.mqar import mqar_batch, mqar_sweep


def test_batches_pair_every_query_with_its_value():
    ids, answer = mqar_batch(16, pairs=5, queries=3, num_keys=10, num_values=7, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (16, 16) and answer.sum() == 16 * 3
    for row, mask in zip(ids, answer):
        pairs = dict(zip(row[:10:2].tolist(), row[1:10:2].tolist()))
        assert len(pairs) == 5 and all(k < 10 <= v < 17 for k, v in pairs.items())
        targets = row[1:][mask].tolist()
        queries = row[10::2].tolist()
        assert targets == [pairs[q] for q in queries]


def test_small_model_learns_to_recall():
    result = mqar_sweep(["baseline"], [0], pairs=4, queries=4, num_keys=16, num_values=16, steps=800, batch=64,
                        eval_size=128)
    # chance is 1/16; a model that copies some value of the context without matching keys gets about 1/4
    assert result["summary"]["baseline"]["mean"] > 0.9
