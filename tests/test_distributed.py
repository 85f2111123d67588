"""Rank awareness: under torch.distributed only rank 0 writes, and no rank's training stalls."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from servers import free_port


def _worker(rank: int, world: int, port: int, tokenizer_dir: str, logdir: str) -> None:
    import psutil
    import torch.distributed as dist
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from attnlog import AttentionLogger

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64)  # fmt: skip
        model = torch.nn.parallel.DistributedDataParallel(BertForSequenceClassification(config))
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        batch = tokenizer(["a b c", "d e f g"], padding=True, return_tensors="pt")
        with AttentionLogger(
            model, tokenizer, ["The cat sat.", ("A pair.", "Of sentences.")],
            sinks=["tensorboard"], logdir=os.path.join(logdir, f"rank{rank}"), views=(),
            writer="process",
        ) as log:  # fmt: skip
            assert log.is_main_process == (rank == 0)
            for step in range(3):
                loss = model(**batch, labels=torch.tensor([0, 1])).logits.sum()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                assert log.log(step) == (rank == 0)
            log.flush(timeout=120)
            writers = [p.pid for p in psutil.Process().children(recursive=True)
                       if "attnlog.writer" in " ".join(p.cmdline())]  # fmt: skip
            Path(logdir, f"writers{rank}").write_text(f"{writers} {log.writer_pid}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
@pytest.mark.skipif(sys.platform != "linux", reason="gloo test runs on Linux")
def test_only_rank_zero_writes_and_starts_a_writer_process_under_ddp(tmp_path, minilm_path):
    from attnlog.layout import read_index

    mp.start_processes(
        _worker, args=(2, free_port(), minilm_path, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    assert [e["step"] for e in read_index(tmp_path / "rank0")] == [0, 1, 2]
    assert list((tmp_path / "rank0").glob("events.out.tfevents.*"))
    assert not (tmp_path / "rank1").exists()  # rank 1 created no folder and wrote nothing
    writers, pid = (tmp_path / "writers0").read_text().rsplit(" ", 1)
    assert writers == f"[{pid}]"  # one writer process, the logger's own
    assert (tmp_path / "writers1").read_text() == "[] None"  # none on rank 1
