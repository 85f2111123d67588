"""Sharded training (FSDP2 `fully_shard`, FSDP1): every rank joins the probe pass, rank 0 keeps it.

The ranks run under `torchrun` (2 CPU processes, gloo) in a subprocess with a time-out, so a
deadlock fails the test instead of hanging the suite. This file is also the ranks' script.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PROBES = ["The cat sat on the mat.", ("A pair.", "Of sentences here.")]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)  # fmt: skip
    return LlamaForCausalLM(config)


def _rank_main(out: Path, tokenizer_dir: str) -> None:
    """One rank: capture from the sharded model, then a failing rank, then logging steps."""
    import numpy as np
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoTokenizer

    import attnlog.capturing.stream as capture_module
    from attnlog import AttentionLogger
    from attnlog.capturing import Capturer
    from attnlog.patterns import score

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result: dict = {"rank": rank}
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = _tiny_llama()
        plain = copy.deepcopy(model).eval()
        reference = Capturer(plain, tokenizer, PROBES, induction_probe=False)(0)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        model.train()

        cap = Capturer(model, tokenizer, PROBES, induction_probe=False)
        result["sharded"] = cap.sharded
        snapshot, table = cap.measure(3)
        result["got_result"] = snapshot is not None
        result["restored"] = model.training and model.config._attn_implementation == "sdpa"
        if snapshot is not None:
            result["max_attention_error"] = max(
                float(np.abs(got.attention.astype("float32") - want.attention.numpy()).max())
                for got, want in zip(snapshot.probes, reference.probes)
            )
            expected = score(reference, step=3).scores
            result["max_score_error"] = max(
                float(np.nanmax(np.abs(table.scores[k] - v))) for k, v in expected.items()
            )

        # A rank that fails before the forward: every rank raises, none waits for the other.
        if rank == 1:
            cap._accumulator = _fail
        try:
            cap.measure(4)
            result["prepare_failure"] = "no error"
        except Exception as ex:
            result["prepare_failure"] = str(ex)
        cap.__dict__.pop("_accumulator", None)

        # A rank whose reduction fails mid-forward: the forward still completes everywhere.
        original = capture_module.Stream._take
        if rank == 1:
            capture_module.Stream._take = lambda *args: _fail()
        try:
            cap.measure(5)
            result["reduce_failure"] = "no error"
        except Exception as ex:
            result["reduce_failure"] = str(ex)
        capture_module.Stream._take = original

        # FSDP1 (the FullyShardedDataParallel wrapper) works the same way.
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = FullyShardedDataParallel(
            _tiny_llama(), device_id=torch.device("cpu"), use_orig_params=True
        )
        fsdp1 = Capturer(wrapped, tokenizer, PROBES, induction_probe=False)
        snapshot, _ = fsdp1.measure(6)
        result["fsdp1_sharded"] = fsdp1.sharded
        if snapshot is not None:
            result["fsdp1_attention_error"] = max(
                float(np.abs(got.attention.astype("float32") - want.attention.numpy()).max())
                for got, want in zip(snapshot.probes, reference.probes)
            )

        # Training with the logger on every rank: rank 0 writes each logged step.
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        batch = tokenizer(["a b c d", "e f g h"], return_tensors="pt")
        with AttentionLogger(
            model, tokenizer, PROBES, sinks=[], logdir=str(out / f"rank{rank}"), views=(),
            induction_probe=False, strict=True,
        ) as log:  # fmt: skip
            for step in range(2):
                loss = model(**batch, labels=batch["input_ids"]).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                log.log(step)
            # the callbacks' end-of-training check: a rank that thinks a step unlogged would
            # enter the next pass alone and wait for the others forever
            result["logged_steps"] = sorted(log.logged_steps)
        # Resumed at step 0: only rank 0 has an index (rank 1's logdir was never written), yet
        # every rank must skip the same replayed steps.
        with AttentionLogger(
            model, tokenizer, PROBES, sinks=[], logdir=str(out / f"rank{rank}"), views=(),
            induction_probe=False, strict=True,
        ) as resumed:  # fmt: skip
            resumed.resume_at(0)
            result["resumed_steps"] = sorted(resumed.logged_steps)
        dist.barrier()  # no rank tears the group down while another still receives
        result["done"] = True
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def _fail(*args, **kwargs):
    raise RuntimeError("injected failure on rank 1")


@pytest.mark.skipif(sys.platform != "linux", reason="gloo test runs on Linux")
def test_fsdp2_ranks_capture_together_and_rank_zero_keeps_the_result(tmp_path, minilm_path):
    from attnlog.layout import read_index

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", __file__, str(tmp_path), minilm_path]  # fmt: skip
    try:
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as ex:
        pytest.fail(f"the ranks did not finish in 300 s (a deadlock?): {ex.stderr}")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert run.returncode == 0, run.stderr[-3000:]
    for result in results:
        assert result["sharded"] and result["restored"] and result["done"]
        assert (
            "injected failure" in result["prepare_failure"]
            or "another rank" in result["prepare_failure"]
        )
        assert result["reduce_failure"] != "no error"
    zero, one = results
    assert zero["got_result"] and not one["got_result"]  # rank 0 keeps the result
    assert zero["max_attention_error"] < 1e-3  # float16 host copy of the same attention
    assert zero["max_score_error"] < 1e-5
    assert zero["fsdp1_sharded"] and zero["fsdp1_attention_error"] < 1e-3
    assert "another rank" in zero["prepare_failure"] and "injected" in one["prepare_failure"]
    assert [e["step"] for e in read_index(tmp_path / "rank0")] == [0, 1]
    assert zero["logged_steps"] == one["logged_steps"] == [0, 1]
    assert zero["resumed_steps"] == one["resumed_steps"] == [1]
    assert not (tmp_path / "rank1").exists()


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]), sys.argv[2])
