import functools
import hashlib
import http.server
import os
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_cifar_pickles

from cifar100_fit.data import (
    CIFAR100_MEAN,
    cifar100_dls,
    crop_flip,
    holdout_indices,
    load_cifar100,
    select_splits,
    stratified_indices,
)
from cifar100_fit.files import DataError, data_folder, download_archive, read_pickle


def test_tiny_pickles_in_the_official_layout_load(tiny_data):
    data = load_cifar100(tiny_data)
    assert data.train.pixels.shape == (400, 3072) and data.train.pixels.dtype == np.uint8
    assert data.test.pixels.shape == (200, 3072)
    assert np.bincount(data.train.labels, minlength=100).tolist() == [4] * 100
    assert data.classes[:2] == ["class_00", "class_01"] and len(data.classes) == 100


def test_data_folder_may_name_the_pickle_folder_itself(tiny_data):
    assert data_folder(tiny_data) == data_folder(tiny_data / "cifar-100-python")


@pytest.mark.real_data
def test_real_data_has_500_train_and_100_test_images_per_class(real_data):
    data = load_cifar100(real_data)
    assert data.train.pixels.shape == (50000, 3072) and data.test.pixels.shape == (10000, 3072)
    assert set(np.bincount(data.train.labels).tolist()) == {500}
    assert set(np.bincount(data.test.labels).tolist()) == {100}
    # known facts of the original: the first train image is cattle, first labels 19, 29, 0
    assert data.train.labels[:3].tolist() == [19, 29, 0] and data.classes[19] == "cattle"
    assert data.train.pixels[0, :3].tolist() == [255, 255, 255]


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_that_calls_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "train"
    path.write_bytes(pickle.dumps({"data": Exploit()}, protocol=2))
    with pytest.raises(DataError, match=r"train is not a safe CIFAR pickle: refusing to load"):
        read_pickle(path)
    assert not (tmp_path / "pwned").exists()


def test_truncated_file_is_reported_by_path(tiny_data):
    path = tiny_data / "cifar-100-python" / "test"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=rf"{path} is truncated or corrupt"):
        load_cifar100(tiny_data)


def test_wrong_shapes_and_labels_are_reported(tmp_path):
    root = write_cifar_pickles(tmp_path)
    path = root / "cifar-100-python" / "train"
    bad = {"data": np.zeros((2, 100), np.uint8), "fine_labels": [0, 1]}
    path.write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match=r"'data' should be an N x 3072 array, found \(2, 100\)"):
        load_cifar100(root)
    bad = {"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 100]}
    path.write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match="fine_labels outside 0..99"):
        load_cifar100(root)


def _serve(folder: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _archive(tmp_path: Path) -> tuple[Path, str]:
    source = write_cifar_pickles(tmp_path / "source")
    archive = tmp_path / "served" / "cifar-100-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-100-python", arcname="cifar-100-python")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_checks_md5_and_extracts(tmp_path, capsys):
    archive, md5 = _archive(tmp_path)
    server = _serve(archive.parent)
    url = f"http://127.0.0.1:{server.server_port}/{archive.name}"
    try:
        with pytest.raises(DataError, match=f"downloaded with md5 {md5}, expected 0+"):
            download_archive(tmp_path / "bad", url=url, md5="0" * 32)
        assert not (tmp_path / "bad").exists()  # nothing half-made is left behind
        download_archive(tmp_path / "good", url=url, md5=md5)
    finally:
        server.shutdown()
    assert load_cifar100(tmp_path / "good").train.pixels.shape == (400, 3072)


def test_download_without_network_says_where_to_put_the_files(tmp_path):
    with pytest.raises(DataError, match=r"copy the folder cifar-100-python/ .* into .*nowhere"):
        download_archive(tmp_path / "nowhere", url="http://127.0.0.1:9/cifar-100-python.tar.gz")


def test_subsets_are_fixed_and_stratified():
    labels = np.repeat(np.arange(100), 500)
    picked = stratified_indices(labels, 0.01)
    assert len(picked) == 500 and set(np.bincount(labels[picked]).tolist()) == {5}
    assert np.array_equal(picked, stratified_indices(labels, 0.01))
    assert len(stratified_indices(np.repeat(np.arange(100), 100), 0.01)) == 100


def test_holdout_is_a_disjoint_stratified_5000():
    labels = np.repeat(np.arange(100), 500)
    train, holdout = holdout_indices(labels)
    assert len(train) == 45000 and len(holdout) == 5000
    assert not set(train) & set(holdout)
    assert set(np.bincount(labels[holdout]).tolist()) == {50}


def test_holdout_validation_never_uses_test_images(tiny_data):
    data = load_cifar100(tiny_data)
    train, valid = select_splits(data, valid="holdout")
    assert len(train.labels) + len(valid.labels) == 400
    train_rows = {row.tobytes() for row in data.train.pixels}
    assert all(row.tobytes() in train_rows for row in valid.pixels)


def _per_image(image, top, left, flip, pad=4):
    padded = F.pad(image, (pad, pad, pad, pad))
    crop = padded[:, top : top + 32, left : left + 32]
    return crop.flip(-1) if flip else crop


def test_batch_crop_flip_equals_its_per_image_definition():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    top, left = torch.randint(0, 9, (2, 16))
    flip = torch.rand(16) < 0.5
    batch = crop_flip(images, top, left, flip)
    assert batch.shape == images.shape and batch.dtype == torch.uint8
    for i in range(16):
        expected = _per_image(images[i], int(top[i]), int(left[i]), bool(flip[i]))
        assert torch.equal(batch[i], expected)


def test_centre_crop_without_flip_is_identity_and_flip_mirrors():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    centre = torch.full((4,), 4)
    assert torch.equal(crop_flip(images, centre, centre, torch.zeros(4, dtype=torch.bool)), images)
    mirrored = crop_flip(images, centre, centre, torch.ones(4, dtype=torch.bool))
    assert torch.equal(mirrored, images.flip(-1))
    shifted = crop_flip(images, centre, centre + 1, torch.zeros(4, dtype=torch.bool))
    assert torch.equal(shifted[..., :-1], images[..., 1:]) and (shifted[..., -1] == 0).all()


def test_train_batches_are_augmented_and_valid_batches_are_not(tiny_data):
    dls = cifar100_dls(bs=50, data=tiny_data, device="cpu")
    x, y = dls.train.one_batch()
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (50,)
    assert len(dls.train) == 8 and len(dls.valid) == 2  # valid batches are twice as large
    first, second = dls.valid.one_batch()[0], dls.valid.one_batch()[0]
    assert torch.equal(first, second)


@pytest.mark.real_data
def test_normalised_real_batches_have_about_zero_mean(real_data):
    dls = cifar100_dls(bs=500, subset=0.1, data=real_data, device="cpu")
    x, _ = dls.valid.one_batch()
    per_channel = x.as_subclass(torch.Tensor).mean(dim=(0, 2, 3))
    assert per_channel.abs().max() < 0.1
    assert x.std() == pytest.approx(1.0, abs=0.1)
    decoded = dls.valid.decode((x,))[0]  # back to 0..255 pixel values
    assert decoded.float().mean(dim=(0, 2, 3)).div(255).tolist() == pytest.approx(
        list(CIFAR100_MEAN), abs=0.05
    )


def test_show_batch_titles_images_with_class_names(tiny_data, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dls = cifar100_dls(bs=20, data=tiny_data, device="cpu")
    batch = dls.train.one_batch()
    _, _, samples = dls.train.show_batch(batch, max_n=4, show=False)
    names = [str(sample[1]) for sample in samples]
    assert names == [f"class_{int(label):02d}" for label in batch[1][:4]]
    dls.show_batch(max_n=4)
    plt.savefig(tmp_path / "batch.png")
    assert (tmp_path / "batch.png").stat().st_size > 1000
