"""Learning-rate schedules against their definition, and the optimizer the step uses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import configuration, optim, strategies


def paper_optimizer(devices_rule: str = "paper"):
    """The `optimizer` section of the paper's config, with `devices_rule` as lr_scaling."""
    config = configuration.load_config("imagenet_resnet50")
    config.optimizer.lr_scaling = devices_rule
    return config.optimizer


def test_the_papers_schedule_at_every_boundary():
    """0.0125 per device, x min(D, 64), warm-up over 5 epochs from the per-device rate, then
    0.5, 0.05 and 0.01 of the peak from epochs 21, 26 and 28."""
    schedule = optim.schedule(paper_optimizer(), num_devices=8, epochs_per_task=30, num_tasks=4)
    base, peak = 0.0125, 0.0125 * 8
    expected = {
        0.0: base,
        2.5: base * (1 + 7 * 0.5),
        4.999: base * (1 + 7 * 4.999 / 5),
        5.0: peak,
        20.999: peak,
        21.0: 0.5 * peak,
        25.999: 0.5 * peak,
        26.0: 0.05 * peak,
        28.0: 0.01 * peak,
        29.99: 0.01 * peak,
    }
    for epoch, rate in expected.items():
        assert schedule(epoch) == pytest.approx(rate, rel=1e-12), epoch


@pytest.mark.parametrize(
    ("rule", "devices", "scale"),
    [("paper", 128, 64), ("paper", 16, 16), ("linear", 128, 128), ("none", 128, 1)],
)
def test_learning_rate_scaling_rules(rule, devices, scale):
    schedule = optim.schedule(paper_optimizer(rule), devices, epochs_per_task=30, num_tasks=4)
    assert schedule.peak == pytest.approx(0.0125 * scale)
    assert schedule(0.0) == pytest.approx(0.0125)


def test_cosine_decays_from_the_peak_to_zero_over_the_scope():
    config = configuration.load_config()
    config.optimizer.update(
        learning_rate=0.1, schedule="cosine", warmup_epochs=2.0, lr_scaling="linear"
    )
    config.optimizer.schedule_scope = "stream"
    schedule = optim.schedule(config.optimizer, num_devices=2, epochs_per_task=5, num_tasks=4)
    assert schedule(2.0) == pytest.approx(0.2)
    assert schedule(11.0) == pytest.approx(0.1)
    assert schedule(20.0) == pytest.approx(0.0, abs=1e-12)


def test_schedule_position_restarts_at_each_task_or_runs_over_the_stream():
    assert optim.scope_epoch("task", 3, 2, 5, 10, 30) == pytest.approx(2.5)
    assert optim.scope_epoch("stream", 3, 2, 5, 10, 30) == pytest.approx(92.5)


def test_the_step_uses_the_learning_rate_it_is_given():
    config = configuration.load_config()
    config.optimizer.update(name="sgd", momentum=0.0, weight_decay=0.0)
    optimizer = optim.create(config.optimizer)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    grads = {"w": jnp.full((2, 2), 2.0), "b": jnp.full(2, 4.0)}
    state = optimizer.init(params)
    for rate in (0.0, 0.25):
        state = optim.with_learning_rate(state, jnp.float32(rate))
        updates, _ = optimizer.update(grads, state, params)
        moved = optax.apply_updates(params, updates)
        np.testing.assert_allclose(moved["w"], 1 - rate * 2.0)
        np.testing.assert_allclose(moved["b"], 1 - rate * 4.0)


@pytest.mark.parametrize("decay_norm_and_bias", [False, True])
def test_weight_decay_spares_biases_and_norm_scales_unless_asked(decay_norm_and_bias):
    config = configuration.load_config()
    config.optimizer.update(
        name="sgd", momentum=0.0, weight_decay=0.1, decay_norm_and_bias=decay_norm_and_bias
    )
    optimizer = optim.create(config.optimizer)
    params = {"kernel": jnp.ones((2, 2)), "scale": jnp.ones(2)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = optim.with_learning_rate(optimizer.init(params), jnp.float32(1.0))
    updates, _ = optimizer.update(zeros, state, params)
    np.testing.assert_allclose(updates["kernel"], -0.1)
    np.testing.assert_allclose(updates["scale"], -0.1 if decay_norm_and_bias else 0.0)


def test_label_smoothing_mixes_a_uniform_target_into_the_cross_entropy():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    labels = jnp.array([0])
    log_p = jax.nn.log_softmax(logits[0])
    smoothed = strategies.row_cross_entropies(logits, labels, label_smoothing=0.3)
    expected = -((1 - 0.3 + 0.1) * log_p[0] + 0.1 * log_p[1] + 0.1 * log_p[2])
    np.testing.assert_allclose(smoothed, [expected], rtol=1e-6)
    np.testing.assert_allclose(strategies.row_cross_entropies(logits, labels), [-log_p[0]])
