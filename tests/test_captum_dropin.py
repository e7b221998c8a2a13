"""``krypton_db.captum.Occlusion`` against Captum 0.9's own ``Occlusion`` on torch modules with
torchvision's building blocks (residual blocks with batch norm, depthwise separable convs with
squeeze-excitation, inception branches joined by concat), built here with seeded weights:
same attributions (1e-5 on probabilities, 1e-5 relative on logits), shape, dtype and device,
for a batch of 3 inputs with different targets, windows and strides that do not divide the
input, scalar and tensor baselines; and the tensor-input API it rests on."""

import numpy as np
import pytest
import torch
from captum.attr import Occlusion as CaptumOcclusion

import krypton_db as kdb
from krypton_db.captum import Occlusion
from krypton_db.errors import InputError

nn = torch.nn
SHAPE = (3, 20, 23)


class BasicBlock(nn.Module):  # torchvision.models.resnet.BasicBlock
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class ResNetLike(nn.Module):  # logits out
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 5, 2, 2, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.layer = BasicBlock(8, 12, 2)
        self.fc = nn.Linear(12, 6)

    def forward(self, x):
        y = self.layer(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


class MobileNetLike(nn.Module):  # depthwise separable + squeeze-excitation, probabilities out
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.ReLU6())
        self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.pw = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        y = self.dw(self.stem(x))
        s = torch.relu(self.se1(nn.functional.adaptive_avg_pool2d(y, 1)))
        y = self.pw(y * nn.functional.hardsigmoid(self.se2(s)))
        return torch.softmax(self.fc(torch.flatten(y.mean((2, 3), keepdim=True), 1)), 1)


class InceptionLike(nn.Module):  # branches joined by concat, logits out
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.ReLU())
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b2 = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, (1, 5), padding=(0, 2)),
                                nn.ReLU(), nn.Conv2d(6, 6, (5, 1), padding=(2, 0)))
        self.b3 = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.Conv2d(8, 3, 1))
        self.fc = nn.Linear(13, 4)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(torch.cat([self.b1(y), self.b2(y), self.b3(y)], 1))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _seeded(cls, seed):
    torch.manual_seed(seed)
    m = cls().eval()
    for mod in m.modules():  # non-trivial batch-norm statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.3, 0.3)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module", params=[(ResNetLike, 1), (MobileNetLike, 2), (InceptionLike, 3)],
                ids=["resnet", "mobilenet", "inception"])
def module(request, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("KRYPTON_CACHE", str(tmp_path_factory.mktemp("cache")))
    cls, seed = request.param
    return _seeded(cls, seed)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _scale(module, x) -> float:
    with torch.no_grad():
        return float(module(x).abs().max())


def _inputs(seed=0, n=3):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n,) + SHAPE).astype(np.float32))


def _check(got, want, probs: bool, logit_scale: float = 1.0):
    """Probabilities: 1e-5 absolute. Logits: 1e-5 relative to the logits' magnitude (an
    attribution is a difference of two logits: float32 rounds each to ~6e-8 of its size)."""
    assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device
    g, w = got.numpy().astype(np.float64), want.numpy().astype(np.float64)
    scale = 1.0 if probs else logit_scale
    assert np.abs(g - w).max() / scale <= 1e-5, np.abs(g - w).max() / scale
    assert np.abs(w).max() > 1e-4  # a real attribution, not two zero maps


@pytest.mark.parametrize("window,strides,baselines", [
    ((3, 5, 4), (3, 3, 2), 0.0),    # windows and strides that do not divide 20 x 23
    ((3, 6, 6), 4, 0.25),           # one int stride for every dimension, a scalar baseline
    ((3, 4, 7), (3, 3, 5), "tensor"),  # a full per-sample baseline tensor
])
def test_attributions_equal_captum(module, window, strides, baselines):
    x = _inputs()
    target = [0, 2, 1]
    if baselines == "tensor":
        baselines = torch.from_numpy(
            np.random.default_rng(9).normal(size=(3,) + SHAPE).astype(np.float32))
    want = CaptumOcclusion(module).attribute(x, sliding_window_shapes=window, strides=strides,
                                             baselines=baselines, target=target)
    got = Occlusion(module).attribute(x, sliding_window_shapes=window, strides=strides,
                                      baselines=baselines, target=target)
    _check(got, want, probs=isinstance(module, MobileNetLike), logit_scale=_scale(module, x))


def test_defaults_one_target_and_a_tuple_of_one_input(module):
    x = _inputs(seed=4, n=1)
    want = CaptumOcclusion(module).attribute((x,), sliding_window_shapes=((3, 7, 7),), target=3)
    got = Occlusion(module).attribute((x,), sliding_window_shapes=((3, 7, 7),), target=3)
    assert isinstance(got, tuple) and len(got) == 1
    _check(got[0], want[0], probs=isinstance(module, MobileNetLike), logit_scale=_scale(module, x))
    b = (torch.full_like(x, 0.3),)  # per-input strides and baselines as 1-tuples too
    want = CaptumOcclusion(module).attribute((x,), ((3, 5, 5),), strides=((3, 2, 4),),
                                             baselines=b, target=3)
    got = Occlusion(module).attribute((x,), ((3, 5, 5),), strides=((3, 2, 4),), baselines=b,
                                      target=3)
    _check(got[0], want[0], probs=isinstance(module, MobileNetLike), logit_scale=_scale(module, x))


def test_double_inputs_and_tensor_targets():
    m = _seeded(ResNetLike, 5)
    x = _inputs(seed=6, n=2).double()
    t = torch.tensor([4, 1])
    want = CaptumOcclusion(m.double()).attribute(x, sliding_window_shapes=(3, 5, 5), target=t,
                                                  strides=(3, 4, 4))
    got = Occlusion(m.float()).attribute(x, sliding_window_shapes=(3, 5, 5), target=t,
                                         strides=(3, 4, 4))
    assert got.dtype == torch.float64
    g, w = got.numpy(), want.numpy()
    assert np.abs(g - w).max() / _scale(m.double(), x) <= 1e-5  # float32 model, float64 Captum


def test_what_it_refuses(module):
    occ = Occlusion(module)
    x = _inputs(n=2)
    with pytest.raises(InputError, match="span every channel"):
        occ.attribute(x, sliding_window_shapes=(1, 5, 5), target=0)
    with pytest.raises(InputError, match="additional_forward_args"):
        occ.attribute(x, sliding_window_shapes=(3, 5, 5), target=0, additional_forward_args=(1,))
    with pytest.raises(InputError, match="target is needed"):
        occ.attribute(x, sliding_window_shapes=(3, 5, 5))
    with pytest.raises(InputError, match="target has 3 entries for 2"):
        occ.attribute(x, sliding_window_shapes=(3, 5, 5), target=[0, 1, 2])
    with pytest.raises(InputError, match="larger than"):
        occ.attribute(x, sliding_window_shapes=(3, 25, 5), target=0)
    with pytest.raises(InputError, match="stride .* larger than the window"):  # as Captum
        occ.attribute(x, sliding_window_shapes=(3, 5, 5), strides=(3, 6, 2), target=0)


def test_tensor_input_api_and_the_torch_export_cache(tmp_path, monkeypatch):
    """occlude(model, input=...) takes normalized tensors as they are (negative values), a
    batch gives one heat map per sample, baselines are in input units; the torch module is
    exported once per weights (a changed weight is a new export)."""
    monkeypatch.setenv("KRYPTON_CACHE", str(tmp_path))
    net = _seeded(ResNetLike, 7)
    m = kdb.load_model(net, input_shape=SHAPE)
    x = _inputs(seed=8, n=2)
    hms = kdb.occlude(m, input=x, patch=6, stride=7, target=[1, 3], score="logit",
                      baselines=-0.5)
    assert isinstance(hms, list) and [h.target for h in hms] == [1, 3]
    # oracle: torch itself on the occluded tensors
    for i, hm in enumerate(hms):
        (y, x0) = hm.positions.reshape(-1, 2)[2]
        occl = x[i : i + 1].clone()
        occl[:, :, y : y + 6, x0 : x0 + 6] = -0.5
        want = net(occl)[0, hm.target].item()
        assert abs(hm.probs.reshape(-1)[2] - want) <= 1e-4 * max(1.0, abs(want))
    one = kdb.occlude(m, input=x[0], patch=6, stride=7, target=1, score="logit",
                      baselines=-0.5)
    np.testing.assert_allclose(one.probs, hms[0].probs, atol=1e-6)
    files = sorted(tmp_path.rglob("torch-*.onnx"))
    assert len(files) == 1
    kdb.load_model(net, input_shape=SHAPE)
    assert sorted(tmp_path.rglob("torch-*.onnx")) == files  # cached
    with torch.no_grad():
        net.fc.bias[0] += 1.0
    kdb.load_model(net, input_shape=SHAPE)
    assert len(list(tmp_path.rglob("torch-*.onnx"))) == 2  # new weights, new export
    with pytest.raises(InputError, match="input_shape"):
        kdb.load_model(net)
    # parameterless structure is part of the key: a Sigmoid instead of a ReLU is another model
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 36, 3)).eval()
    torch.manual_seed(0)
    sig = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(2 * 36, 3)).eval()
    z = torch.randn(1, 3, 8, 8)
    for mod in (relu, sig):
        km = kdb.load_model(mod, input_shape=(3, 8, 8))
        np.testing.assert_allclose(km.logits(z.numpy()), mod(z).detach().numpy(), atol=1e-5)
    with pytest.raises(InputError, match="either image"):
        kdb.occlude(m, np.zeros((20, 23, 3)), input=x)
    with pytest.raises(InputError, match="baselines .* do not broadcast"):
        kdb.occlude(m, input=x, baselines=np.zeros((2, 2)), target=0)
    with pytest.raises(InputError, match="does not fit the model"):
        kdb.occlude(m, input=x[:, :, :10], target=0)
