"""The CPU benchmark against PyTorch compares the same network and the same ProsPr scores."""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is the optional benchmark dependency (prospr-jax[bench])")
# torch.func's first use imports this module, which sets TORCHINDUCTOR_CACHE_DIR: imported here,
# at collection, so that no test is the one that changed the environment.
import torch._dynamo.package  # noqa: E402,F401

from experiments import bench_cpu  # noqa: E402


def _setup(batch_size: int):
    tasks, setup = bench_cpu._jax_tasks(batch_size)
    return setup


def test_the_pytorch_resnet20_is_the_zoo_resnet20():
    # Same weights, same batch: the train-mode losses and the parameter gradients agree to float32
    # rounding (O(1) loss; gradients compared at the scale of each layer's largest entry).
    import prospr_jax as pj  # noqa: F401
    from prospr_jax import models

    setup = _setup(batch_size=4)
    net = bench_cpu.torch_resnet20()
    bench_cpu.copy_flax_params_into_torch(setup["params"], net)
    images = torch.from_numpy(np.transpose(np.asarray(setup["batches"]["image"][0]), (0, 3, 1, 2)).copy())
    labels = torch.from_numpy(np.asarray(setup["batches"]["label"][0]).astype(np.int64))
    net.train()
    loss = torch.nn.functional.cross_entropy(net(images), labels)
    assert float(loss) == pytest.approx(setup["loss"], rel=1e-4)
    loss.backward()

    model = models.get("resnet20", num_classes=10)
    _, batch_stats = models.init(model, jax.random.key(0), (1, 32, 32, 3))
    loss_fn = models.make_loss_fn(model, batch_stats, train=True)
    grads = jax.grad(loss_fn)(setup["params"], jax.tree_util.tree_map(lambda b: b[0], setup["batches"]))
    pairs = [(net.conv_stem.weight.grad, grads["conv_stem"]["kernel"]), (net.logits.weight.grad.T, grads["logits"]["kernel"])]
    names = sorted(k for k in grads if k.startswith("layer"))
    for name, block in zip(names, net.blocks):
        pairs += [(block.conv1.weight.grad, grads[name]["conv1"]["kernel"]), (block.bn2.bias.grad, grads[name]["bn2"]["bias"])]
    for got, expected in pairs:
        got, expected = got.numpy(), np.asarray(expected)
        if got.ndim == 4:
            got = np.transpose(got, (2, 3, 1, 0))  # OIHW -> HWIO
        scale = np.max(np.abs(expected))
        # float32 sums over a batch of 4 through 20 layers, two frameworks: 1e-3 of the scale.
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * scale)


@pytest.mark.slow
def test_the_pytorch_prospr_scores_are_the_projects(tmp_path):
    # The authors' formulation (unrolled create_graph meta-gradient) against this project's default
    # (backward Hessian-vector products): the same quantity by two independent computations.
    tasks, setup = bench_cpu._jax_tasks(batch_size=4)
    torch_tasks, _ = bench_cpu._torch_tasks(setup)
    expected = tasks["prospr"]()
    got = torch_tasks["prospr"]()
    kernels = [expected["conv_stem"]["kernel"]]
    for name in sorted(k for k in expected if k.startswith("layer")):
        kernels += [expected[name]["conv1"]["kernel"], expected[name]["conv2"]["kernel"]]
    kernels.append(expected["logits"]["kernel"])
    assert len(got) == len(kernels)
    for g, e in zip(got, kernels):
        g, e = g.numpy(), np.asarray(e)
        g = np.transpose(g, (2, 3, 1, 0)) if g.ndim == 4 else g.T
        # Float32 through 3 steps of lr 0.1 and a second-order backward pass: rounding differences of
        # the two frameworks grow with the curvature along the way (entries near 0 can differ by 1e-2
        # of the layer's scale; whole layers by about 0.7% in relative norm), so each layer is
        # compared as a whole, to 2% in relative norm. A wrong layer, mask or step changes the scores
        # by about 100%.
        assert np.linalg.norm(g - e) / np.linalg.norm(e) < 2e-2


def test_quick_run_prints_ratios(capsys):
    results = bench_cpu.main(["--quick", "--threads", "1", "--tasks", "forward", "gradient"])
    (result,) = results
    rows = {r["task"]: r for r in result["rows"]}
    assert set(rows) == {"forward", "gradient"}
    for r in rows.values():
        assert r["jax_ms"] > 0 and r["torch_ms"] > 0
        assert r["ratio"] == pytest.approx(r["jax_ms"] / r["torch_ms"])
    assert "ratio" in capsys.readouterr().out
