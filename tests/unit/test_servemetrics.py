"""`kubetune serve`'s hand-written Prometheus exposition."""

import pytest

from kubetune_trainer.servemetrics import ServeMetrics

pytestmark = pytest.mark.unit


def test_counters_gauges_and_label_escaping():
    m = ServeMetrics()
    text = m.render()
    assert "# TYPE kubetune_serve_requests_total counter" in text
    assert "\nkubetune_serve_requests_running 0\n" in text  # gauges exist from the start
    assert "kubetune_serve_requests_total{" not in text  # counters appear when used
    m.finished('we"ird\\name', "stop", 7, 3)
    m.finished('we"ird\\name', "stop", 2, 1)
    m.inc("kubetune_serve_requests_running", 1)
    m.set("kubetune_serve_adapters_loaded", 2)
    lines = m.render().splitlines()
    assert 'kubetune_serve_requests_total{finish="stop",model="we\\"ird\\\\name"} 2' in lines
    assert 'kubetune_serve_generation_tokens_total{model="we\\"ird\\\\name"} 4' in lines
    assert 'kubetune_serve_prompt_tokens_total{model="we\\"ird\\\\name"} 9' in lines
    assert "kubetune_serve_requests_running 1" in lines
    assert "kubetune_serve_adapters_loaded 2" in lines


def test_a_crafted_label_value_cannot_add_lines_or_series():
    from kubetune_trainer.servemetrics import ServeMetrics

    m = ServeMetrics()
    m.finished('evil"} 1\nkubetune_fake_total 99\n#', "stop", 3, 4)
    text = m.render()
    assert "\nkubetune_fake_total" not in text
    assert all(line.startswith(("#", "kubetune_serve_")) for line in text.splitlines() if line)
    assert '\\"} 1\\nkubetune_fake_total 99\\n#' in text
