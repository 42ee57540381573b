"""The learning-rate schedule: warm-up then cosine, and resized without a jump when a resume changes the length."""

from infopo_cli.train.schedule import WarmupCosine


def test_warmup_then_cosine_to_zero():
    s = WarmupCosine(peak=1.0, warmup=4, total=20)
    assert [round(s.factor(d), 3) for d in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert s.factor(20) == 0.0 and all(s.factor(d) > s.factor(d + 1) for d in range(4, 20))


def test_resized_after_warmup_continues_from_the_current_rate():
    s = WarmupCosine(peak=1.0, warmup=4, total=20)
    longer = s.resized(10, 40)
    assert longer.factor(10) == s.factor(10)  # the next step's rate is what it would have been
    assert longer.factor(40) == 0.0 and all(longer.factor(d) > longer.factor(d + 1) for d in range(10, 40))
    shorter = s.resized(10, 12)
    assert shorter.factor(10) == s.factor(10) and shorter.factor(12) == 0.0


def test_resized_during_warmup_keeps_the_warmup_unless_the_run_ends_inside_it():
    s = WarmupCosine(peak=1.0, warmup=30, total=300)
    longer = s.resized(10, 600)
    assert [longer.factor(d) for d in range(31)] == [s.factor(d) for d in range(31)]
    assert longer.factor(600) == 0.0
    ends_in_warmup = s.resized(10, 20)  # the run now ends before the warm-up would: decay from here instead
    assert ends_in_warmup.factor(10) == s.factor(10) and ends_in_warmup.factor(20) == 0.0
    assert all(ends_in_warmup.factor(d) >= ends_in_warmup.factor(d + 1) for d in range(10, 20))


def test_state_dict_round_trips_and_resizing_twice_stays_continuous():
    s = WarmupCosine(peak=2e-4, warmup=4, total=20).resized(10, 40)
    again = WarmupCosine.from_state_dict(s.state_dict())
    assert again == s
    twice = again.resized(25, 60)
    assert twice.factor(25) == s.factor(25) and twice.factor(60) == 0.0
