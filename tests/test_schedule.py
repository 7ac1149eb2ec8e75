import math

import pytest

from sst_dist.config import load_recipe
from sst_dist.errors import ConfigError
from sst_dist.schedule import Schedule


def test_events_iterations_and_rounds():
    s = Schedule(1e-3, 1e-3, warmup_steps=10, rewarm_steps=3, steps_per_iteration=5, iterations_per_round=4)
    events = {t: s.event(t) for t in range(45) if s.event(t)}
    assert sorted(events) == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [t for t, e in events.items() if e.resvd] == [20, 40]
    assert events[25].iteration == 5


def test_warmup_and_rewarm():
    s = Schedule(1.0, 2.0, warmup_steps=4, rewarm_steps=3, steps_per_iteration=10)
    assert [s.learning_rates(t)[0] for t in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    # before the first reset the low-rank group follows the warm-up only
    assert s.learning_rates(9) == (1.0, 2.0)
    assert [round(s.learning_rates(t)[1], 6) for t in (10, 11, 12, 13)] == [0.666667, 1.333333, 2.0, 2.0]


def test_no_events_for_methods_without_resets():
    s = Schedule(1.0, 1.0, warmup_steps=0)
    assert all(s.event(t) is None for t in range(100))
    assert s.learning_rates(0) == (1.0, 1.0)


def test_tiny_sst_recipe_crosses_resamples_and_a_resvd_in_40_steps():
    from sst_dist.methods import build_method
    from sst_dist.models import build_model

    recipe = load_recipe("recipes/tiny-sst.yaml")
    method = build_method(recipe, build_model("tiny", vocab_size=256, seq_len=recipe.model.seq_len))
    events = [method.schedule.event(t) for t in range(40)]
    assert sum(1 for e in events if e and not e.resvd) >= 2
    assert sum(1 for e in events if e and e.resvd) >= 1


def _cosine(step, warmup, max_steps, ratio):
    """GaLore's warm-up + cosine-to-min_lr_ratio, written out: linear to the peak at step
    warmup - 1, then 0.5 (1 + cos(pi p)) from there to the last step (max_steps - 1)."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - (warmup - 1)) / (max_steps - warmup)
    return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * p))


def test_cosine_against_the_closed_form():
    s = Schedule(1e-2, 4e-3, warmup_steps=100, decay="cosine", min_lr_ratio=0.1, max_steps=1100)
    for step, expected in [(99, 1.0), (599, 0.55), (1099, 0.1)]:  # warm-up end, middle, last step
        assert math.isclose(s.lr_factor(step), expected, rel_tol=1e-12)
    for step in (0, 50, 99, 100, 333, 599, 800, 1098, 1099):
        full, lowrank = s.learning_rates(step)
        assert math.isclose(full, 1e-2 * _cosine(step, 100, 1100, 0.1), rel_tol=1e-12)
        assert math.isclose(lowrank, 4e-3 * _cosine(step, 100, 1100, 0.1), rel_tol=1e-12)
    factors = [s.lr_factor(t) for t in range(99, 1100)]
    assert all(a > b for a, b in zip(factors, factors[1:]))  # strictly down from the peak


def test_cosine_re_warm_multiplies_on_top():
    s = Schedule(1.0, 2.0, warmup_steps=10, rewarm_steps=4, steps_per_iteration=50, decay="cosine",
                 min_lr_ratio=0.0, max_steps=200)
    for step in (50, 51, 52, 53, 54, 120):
        assert math.isclose(s.learning_rates(step)[1],
                            2.0 * _cosine(step, 10, 200, 0.0) * s.rewarm_factor(step), rel_tol=1e-12)
    assert s.learning_rates(50)[1] < s.learning_rates(49)[1] / 2  # the re-warm restarts from a quarter


def test_constant_is_unchanged_and_ignores_the_decay_settings():
    old = lambda t: min(1.0, (t + 1) / 7)  # noqa: E731 (the schedule before optim.schedule)
    for s in (Schedule(3e-3, 5e-3, warmup_steps=7, rewarm_steps=3, steps_per_iteration=20),
              Schedule(3e-3, 5e-3, warmup_steps=7, rewarm_steps=3, steps_per_iteration=20, min_lr_ratio=0.5,
                       max_steps=30)):
        for t in range(60):
            assert s.learning_rates(t) == (3e-3 * old(t), 5e-3 * old(t) * s.rewarm_factor(t))


def test_recipe_cosine_reaches_every_group_and_resumes_from_the_step_alone():
    from sst_dist.methods import build_method
    from sst_dist.models import build_model

    def method(name):
        recipe = load_recipe(f"recipes/tiny-{name}.yaml", ["optim.schedule=cosine", "optim.min_lr_ratio=0.2",
                                                         "optim.warmup_steps=4", "train.max_steps=40"])
        return build_method(recipe, build_model("tiny", vocab_size=256, seq_len=recipe.model.seq_len)), recipe

    galore, recipe = method("galore")
    last = galore.learning_rates(39)
    assert math.isclose(last["full"], 0.2 * recipe.optim.lr, rel_tol=1e-12)
    assert math.isclose(last["galore"], 0.2 * recipe.galore.lr, rel_tol=1e-12)
    sst, _ = method("sst")
    walked = [sst.learning_rates(t) for t in range(40)]
    resumed, _ = method("sst")  # a resumed run rebuilds the method and starts at its step
    assert [resumed.learning_rates(t) for t in range(23, 40)] == walked[23:]


def test_bad_schedule_values_say_what_to_write():
    with pytest.raises(ConfigError, match="optim.schedule: 'linear' is not one of constant, cosine"):
        load_recipe("recipes/tiny-full.yaml", ["optim.schedule=linear"])
    with pytest.raises(ConfigError, match=r"optim.min_lr_ratio: 1.5 must be in \[0, 1\]"):
        load_recipe("recipes/tiny-full.yaml", ["optim.min_lr_ratio=1.5"])
