"""The C type model's layout rules, the model's JSON round trip and the renderer's determinism."""

from __future__ import annotations

from hypothesis import given

from generators.ctype import Array, Enum, Field, Record, Scalar, init_slots, leaves, resolve, wrap
from generators.model import dumps, loads
from generators.render import render_global, render_lowered
from generators.strategies import program_models

U8, S32, U64 = Scalar("u8"), Scalar("s32"), Scalar("u64")


def test_struct_layout_pads_to_member_alignment():
    rec = Record("t", "struct", (Field("a", U8), Field("b", U64), Field("c", U8)))
    assert rec.offsets() == (0, 8, 16)
    assert (rec.size, rec.align) == (24, 8)


def test_packed_struct_has_no_padding_and_alignment_one():
    rec = Record("t", "struct", (Field("a", U8), Field("b", U64)), packed=True)
    assert rec.offsets() == (0, 1)
    assert (rec.size, rec.align) == (9, 1)


def test_member_and_type_alignment_attributes():
    rec = Record("t", "struct", (Field("a", U8), Field("b", U8, aligned=16)), aligned=8)
    assert rec.offsets() == (0, 16)
    assert (rec.size, rec.align) == (32, 16)


def test_union_overlaps_members_and_initialises_the_first():
    uni = Record("u", "union", (Field("a", U8), Field("b", U64)))
    assert (uni.size, uni.offsets()) == (8, (0, 0))
    assert [s.path for s in init_slots(uni)] == [("a",)]
    assert [s.path for s in leaves(uni)] == [("a",), ("b",)]


def test_multidimensional_array_paths():
    arr = Array(Array(S32, 3), 2)
    assert arr.size == 24
    assert resolve(arr, (1, 2)).offset == 20


def test_conversions_follow_c():
    assert wrap(256 + 5, U8) == 5
    assert wrap(0xFFFFFFFF, S32) == -1
    assert wrap(7, Scalar("bool")) == 1
    assert Enum("e", (("A", 0), ("B", 3))).signed is False
    assert Enum("e", (("A", -1),)).signed is True


@given(program_models())
def test_model_json_round_trips_exactly(model):
    assert loads(dumps(model)) == model


@given(program_models())
def test_rendering_is_deterministic(model):
    assert render_global(model) == render_global(model)
    offsets = {v.name: 0 for v in model.variables}
    assert render_lowered(model, offsets) == render_lowered(model, offsets)


def test_nested_initialiser_keeps_every_value():
    # regression: a generator-based cursor lost the values after the first inner list
    from generators.render import initializer

    nested = Array(Array(Array(U8, 2), 2), 1)
    assert initializer(nested, (0, 0, 0, 1)) == " = { { { 0, 0 }, { 0, 1 } } }"
    rec = Record("r", "struct", (Field("a", Array(U8, 2)), Field("b", Scalar("u32"))))
    assert initializer(rec, (1,)) == " = { { 1 } }"
