"""bpf_map__set_initial_value before load: the new value becomes the image of every possible CPU (per-CPU
maps) or of the one shared value, and the runs start from it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from generators.strategies import program_models
from oracle.predict import predict
from oracle.profiles import profile
from suites.support import assert_same, backend_meta, compile_global, runs_of, valid_for_types


@given(st.data())
def test_set_initial_value_replaces_the_image_on_every_cpu(clang, backend, data):
    model = data.draw(program_models(cpus=backend.online_cpus), label="model")
    compiled = compile_global(clang, model)
    plain = predict(model, compiled.facts, profile(backend.profile), possible_cpus=backend.possible_cpus,
                    online_cpus=list(backend.online_cpus))
    # global-data maps only: a `.maps` map (the tail calls' jmp_table) has no image to replace
    maps = [m for m in plain["maps"] if m["section"] is not None and (m["created"] or m["type"] == "percpu_array")]
    if not maps or not plain["open"]["ok"]:
        return  # nothing to set: the object has no map this loader creates
    target = data.draw(st.sampled_from(maps), label="map")
    size = target["value_size"]
    value = valid_for_types(model, target["section"], data.draw(st.binary(min_size=size, max_size=size),
                                                                 label="value"), compiled)
    expected = predict(model, compiled.facts, profile(backend.profile), possible_cpus=backend.possible_cpus,
                       online_cpus=list(backend.online_cpus), initial_images={target["section"]: value})
    observed = backend.observe(compiled, runs_of(model), initial_values={target["name"]: value})
    assert_same(f"initial-{backend.name}", compiled, expected, observed, meta=backend_meta(backend))
