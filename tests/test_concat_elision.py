"""Concat elision (``cpu.concat_slots``): a value read only by one channel concat is written by
its producer straight into its slice of the concat's buffer. Checked against ONNX Runtime
(full inference, intermediate tensors included) and naive re-inference (exact occlusion),
with the slots the planner picks and the copies the concat still makes asserted."""

import numpy as np
import onnx
import pytest
from onnx_builders import Net, ort_run, with_outputs

import krypton_db as kdb
from krypton_db.exec import cpu as C
from krypton_db.graph import Op
from krypton_db.occlusion import occlude


def _net():
    """Branches into a concat: a 1x1 conv + ReLU, a 3x3 conv feeding a nested concat of a 1x3
    and a 3x1 conv (Inception3's Mixed_7b shape), an average pool + 1x1 conv, a max pool, and
    a conv whose output is also read after the concat (two readers: copied). Then a concat
    of a value and an Add that also reads it, a concat reading one value twice (copied both
    times) and a head."""
    net = Net((1, 3, 15, 17), seed=11)
    x = net.op("Relu", [net.conv("input", 3, 20)])  # 15 x 17
    b1 = net.op("Relu", [net.conv(x, 20, 8, k=(1, 1), pads=(0, 0, 0, 0))])
    m = net.op("Relu", [net.conv(x, 20, 16)])
    b2 = net.op("Concat", [net.conv(m, 16, 6, k=(1, 3), pads=(0, 1, 0, 1)),
                           net.op("Relu", [net.conv(m, 16, 5, k=(3, 1), pads=(1, 0, 1, 0))])], axis=1)
    b3 = net.conv(net.op("AveragePool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),
                  20, 7, k=(1, 1), pads=(0, 0, 0, 0))
    b4 = net.op("MaxPool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    shared = net.conv(x, 20, 4, k=(1, 1), pads=(0, 0, 0, 0))
    cat = net.op("Concat", [b1, b2, b3, b4, shared], axis=1)  # 8 + 11 + 7 + 20 + 4 = 50
    y = net.op("Relu", [net.conv(cat, 50, 12, stride=(2, 2))])  # 8 x 9
    twice = net.op("Concat", [y, net.op("Add", [y, net.conv(shared, 4, 12, stride=(2, 2))])], axis=1)
    dup = net.op("Concat", [twice, twice], axis=1)  # 48 channels
    f = net.op("Flatten", [net.op("GlobalAveragePool", [dup])], axis=1)
    return net.model(net.op("Softmax", [net.gemm(f, 48, 6)], axis=1)), (15, 17), (b1, b2, b3, b4, shared, cat)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    onnx_model, hw, names = _net()
    p = tmp_path_factory.mktemp("elide") / "elide.onnx"
    onnx.save(onnx_model, p)
    return onnx_model, kdb.load_model(p), hw, names


def _node(onnx_model, tensor: str) -> str:
    """Our graph's name for the value ONNX calls ``tensor`` (its producing node's name)."""
    return next(n.name for n in onnx_model.graph.node if tensor in n.output)


def test_slots(model):
    onnx_model, m, _, tensors = model
    b1, b2, b3, b4, shared, cat = (_node(onnx_model, t) for t in tensors)
    plan = m.executor.plan
    g = m.graph
    slots = plan.slots
    by_concat: dict[str, list[tuple[str, int]]] = {}
    for v, (q, c0) in slots.items():
        by_concat.setdefault(q, []).append((v, c0))
    twice = next(s.node.name for s in plan.steps if s.node.op is Op.CONCAT and s.node.inputs[0] != b2
                 and s.node.name not in (b2, cat) and len(set(s.node.inputs)) == 2)
    # `twice`: its Add input has a slot (read by it alone), its first input (also read by
    # the Add) none
    assert set(by_concat) == {b2, cat, twice} and [c0 for _, c0 in by_concat[twice]] == [12]
    # the outer concat: b1 at 0, the nested concat b2 at 8, b3 at 19, b4 at 26; not `shared`
    # (two readers)
    assert sorted(c0 for _, c0 in by_concat[cat]) == [0, 8, 19, 26]
    assert slots[b2] == (cat, 8) and slots[b1] == (cat, 0) and slots[b3] == (cat, 19) and slots[b4] == (cat, 26)
    assert shared not in slots
    # the inner concat's two convs (the 3x1 one through its fused ReLU)
    assert sorted(c0 for _, c0 in by_concat[b2]) == [0, 6]
    assert all(g[v].op in (Op.CONV, Op.RELU, Op.MAXPOOL, Op.CONCAT, Op.ADD) for v in slots)


@pytest.mark.slow
def test_full_inference_matches_ort_with_intermediates(model, monkeypatch):
    onnx_model, m, (h, w), tensors = model
    t_b2, t_cat = tensors[1], tensors[5]
    b2, cat = _node(onnx_model, t_b2), _node(onnx_model, t_cat)
    x = np.random.default_rng(3).random((5, 3, h, w)).astype(np.float32)
    checks = []
    real = C._in_slot
    monkeypatch.setattr(C, "_in_slot", lambda v, dst: checks.append((v.shape[0], real(v, dst))) or checks[-1][1])
    ours = m.executor.run(x, outputs=[cat, b2, m.graph.output])
    monkeypatch.undo()
    ref = ort_run(with_outputs(onnx_model, [t_cat, t_b2]), x)
    np.testing.assert_allclose(ours[m.graph.output], ref[0], atol=1e-6)
    np.testing.assert_allclose(ours[cat], ref[1], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(ours[b2], ref[2], atol=2e-5, rtol=1e-5)
    # the concats' inputs in order: b2's two convs (in place), the outer five (b1, b2, b3, b4
    # in place; `shared` copied), `twice` (y copied; the Add in place), `dup` (both copied)
    assert checks == [(6, True), (5, True), (8, True), (11, True), (7, True), (20, True), (4, False),
                      (12, False), (12, True), (24, False), (24, False)]


@pytest.mark.parametrize("patch,stride", [((4, 5), (3, 4)), ((12, 14), (1, 1))])
def test_exact_occlusion_equals_naive(model, monkeypatch, patch, stride):
    """Small patches keep the branches patches (merged by bounding box); large ones make them
    whole-map, where the batches' values go into the concats' slices (counted here: the
    incremental executor's ledger, not the materialization's)."""
    from krypton_db.exec.incremental import PlannedArena

    _, m, (h, w), _ = model
    img = np.random.default_rng(5).random((h, w, 3)).astype(np.float32)
    a = occlude(m, img, patch=patch, stride=stride, mode="naive", all_classes=True)
    slotted = []
    real = C.BufferLedger._slot_or_alloc

    def spy(self, name, shape):
        if name in self.slots and isinstance(self.arena, PlannedArena):
            slotted.append(name)
        return real(self, name, shape)

    monkeypatch.setattr(C.BufferLedger, "_slot_or_alloc", spy)
    b = occlude(m, img, patch=patch, stride=stride, mode="exact", all_classes=True, batch_size=5)
    if patch == (12, 14):
        assert slotted, "no value of the batches was written into a concat's slice"
    assert np.abs(a.all_probs - b.all_probs).max() <= 1e-5
    assert a.probs.std() > 1e-5


def test_slot_with_unplanned_shape_falls_back(tmp_path):
    """A request whose shape is not the slot's (spatial size off) gets its own buffer; the
    concat then copies it."""
    net = Net((1, 3, 8, 8), seed=2)
    a = net.conv("input", 3, 4, k=(1, 1), pads=(0, 0, 0, 0))
    b = net.conv("input", 3, 5, k=(1, 1), pads=(0, 0, 0, 0))
    cat = net.op("Concat", [a, b], axis=1)
    f = net.op("Flatten", [net.op("GlobalAveragePool", [cat])], axis=1)
    onnx_model = net.model(net.op("Softmax", [net.gemm(f, 9, 3)], axis=1))
    onnx.save(onnx_model, tmp_path / "n.onnx")
    m = kdb.load_model(tmp_path / "n.onnx")
    a, b, cat = (_node(onnx_model, t) for t in (a, b, cat))
    ledger = C.BufferLedger(C._Arena(), m.executor.plan)
    first = ledger.out_alloc(a)((4, 2, 8, 8))
    other = ledger.out_alloc(b)((5, 2, 7, 8))  # not the planned spatial size
    buf = ledger.out_alloc(cat)((9, 2, 8, 8))
    assert np.shares_memory(first, buf) and not np.shares_memory(other, buf)
    assert first.__array_interface__["data"][0] == buf.__array_interface__["data"][0]
    assert ledger.owned[cat] == [buf]  # the concat owns its buffer, from the first slice on
