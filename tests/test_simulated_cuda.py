"""The stand-in CUDA device the `--device cuda` tests run on refuses what CUDA refuses, so those tests can fail."""
from __future__ import annotations

import threading

import pytest
import torch

from tests.simulated_cuda import OnDevice, simulated_cuda


def test_tensors_put_on_the_device_say_so_and_compute_on_the_cpu():
    real = torch.cuda.is_available, threading.Thread.run
    with simulated_cuda() as placed:
        assert torch.cuda.is_available()
        x = torch.arange(12, dtype=torch.float32).reshape(3, 4).to("cuda")
        y = torch.zeros(3, 4, device=x.device) + x * 2
        assert isinstance(y, OnDevice) and y.device == torch.device("cuda", 0)
        assert y.T.device.type == "cuda" and y[torch.tensor([0, 2])].device.type == "cuda"  # host indices are fine
        y[:, 0] = torch.tensor(1.0)  # and so are host scalars
        host = y.cpu()
        assert type(host) is torch.Tensor and host.tolist()[0] == [1.0, 2.0, 4.0, 6.0]
        host[0, 0] = 100  # a copy, as from a GPU
        assert float(y[0, 0]) == 1.0
        assert placed.count >= 2
    assert (torch.cuda.is_available, threading.Thread.run) == real


@pytest.mark.parametrize("mistake, words", [
    (lambda x: x + torch.ones(3, 4), "same device"),
    (lambda x: torch.cat([x, torch.ones(3, 4)]), "same device"),
    (lambda x: x.__setitem__(torch.tensor([0]), torch.ones(1, 4)), "same device"),
    (lambda x: torch.quantile(x.flatten(), torch.tensor([0.25, 0.75])), "same device"),
    (lambda x: torch.rand(3, generator=torch.Generator(), device=x.device), "generator"),
    (lambda x: x.numpy(), "numpy"),
])
def test_mixing_host_and_device_tensors_is_refused(mistake, words):
    with simulated_cuda():
        x = torch.ones(3, 4).to("cuda")
        with pytest.raises((RuntimeError, TypeError), match=words):
            mistake(x)


def test_threads_started_inside_the_simulation_run_in_it():
    seen = []
    with simulated_cuda():
        worker = threading.Thread(target=lambda: seen.append(torch.ones(2).to("cuda").device.type))
        worker.start()
        worker.join()
    assert seen == ["cuda"]
