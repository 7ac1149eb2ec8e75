from sst_dist.config import load_recipe
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
