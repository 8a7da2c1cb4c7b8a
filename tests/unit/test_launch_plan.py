"""The launcher's plan: one worker per visible GPU, or one CPU worker."""

from worker.launch import plan


def test_one_process_per_gpu_named_after_it():
    assert plan([0, 1, 2], cpu=False) == [("gpu0", "cuda:0"), ("gpu1", "cuda:1"), ("gpu2", "cuda:2")]


def test_cpu_worker_when_no_gpu_or_asked():
    assert plan([], cpu=False) == [("cpu", "cpu")]
    assert plan([0, 1], cpu=True) == [("cpu", "cpu")]
