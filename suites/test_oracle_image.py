"""The oracle's initial images, built from the model's initialisers, equal what clang put in each section; and
every possible CPU starts from that one image."""

from __future__ import annotations

from hypothesis import example, given

from corpus.selftest import selftest_model
from generators.model import ProgramModel
from generators.strategies import program_models
from oracle.predict import predict
from oracle.profiles import profile
from schema.result import Result, validate
from suites.support import compile_global
from toolchain.elf import ObjectFacts


def check_images(prediction: Result, facts: ObjectFacts, possible_cpus: int) -> None:
    assert not validate(prediction), validate(prediction)
    for m in prediction["maps"]:
        if not m["created"] or m["section"] is None:  # a `.maps` map (jmp_table) has no section image
            continue
        section = facts.require_section(m["section"])
        expected = section.data[: m["value_size"]].ljust(m["value_size"], b"\0").hex()
        slots = m["before"]
        assert len(slots) == (possible_cpus if m["type"] == "percpu_array" else 1), f"{m['name']}: slot count"
        for cpu, slot in enumerate(slots):
            assert slot == expected, f"{m['name']} cpu{cpu}: image {slot} != section bytes {expected}"


@given(program_models())
@example(selftest_model())
def test_predicted_initial_image_is_the_section_contents_on_every_possible_cpu(clang, config, model: ProgramModel):
    compiled = compile_global(clang, model)
    prediction = predict(model, compiled.facts, profile("merged"), possible_cpus=config.possible_cpus,
                         online_cpus=list(config.online_cpus), clang=clang.version)
    check_images(prediction, compiled.facts, config.possible_cpus)
