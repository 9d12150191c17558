import io
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from shrinkcli.data import load_pairs, normalize, open_dataset
from shrinkcli.data.recordio import MAGIC_BYTES, RecordFile, pack_header
from shrinkcli.data.recordio_writer import frame_record, write_recordio
from shrinkcli.errors import BadInputError


def _png(colour, size=(20, 16)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _tree(tmp_path, identities=3, per=2):
    root = tmp_path / "faces"
    for i in range(identities):
        folder = root / f"person_{i}"
        folder.mkdir(parents=True)
        for k in range(per):
            Image.new("L" if k else "RGB", (24, 20), 40 * i + k).save(folder / f"{k}.{'pgm' if k else 'png'}")
    return root


def test_folder_labels_sorted_and_greyscale_to_rgb(tmp_path):
    root = _tree(tmp_path)
    ds = open_dataset(str(root), input_size=16)
    assert ds.num_classes == 3 and list(ds.labels) == [0, 0, 1, 1, 2, 2]
    image, label, index = ds[3]
    assert image.shape == (3, 16, 16) and label == 1 and index == 3
    raw = ds.load_uint8(3)
    assert (raw[0] == raw[1]).all() and (raw[1] == raw[2]).all() and raw[0, 0, 0] == 41
    assert float(image[0, 0, 0]) == pytest.approx((41 - 127.5) / 127.5)


def test_empty_identity_folder_and_corrupt_image(tmp_path):
    root = _tree(tmp_path)
    (root / "zz_empty").mkdir()
    with pytest.raises(BadInputError, match="zz_empty"):
        open_dataset(f"folder:{root}")
    ds = open_dataset(f"folder:{root}", skip_corrupt=True, input_size=8)
    assert ds.skipped == 1 and ds.num_classes == 3
    (root / "person_1" / "0.png").write_bytes(_png((1, 2, 3))[:30])  # truncated
    (root / "zz_empty").rmdir()
    strict = open_dataset(f"folder:{root}", input_size=8)
    with pytest.raises(BadInputError, match="0.png"):
        strict[2]
    image, label, _ = ds[2]  # substituted by the other image of the same identity
    assert label == 1 and ds.skipped == 2


def test_bad_specs(tmp_path):
    with pytest.raises(BadInputError):
        open_dataset(str(tmp_path / "missing"))
    with pytest.raises(BadInputError):
        open_dataset("synthetic:x")
    with pytest.raises(BadInputError):
        open_dataset(str(tmp_path))  # empty folder


def test_synthetic_deterministic_and_seed_gives_new_identities():
    a = open_dataset("synthetic:3:2:0", input_size=32)
    b = open_dataset("synthetic:3:2:0", input_size=32)
    c = open_dataset("synthetic:3:2:1", input_size=32)
    assert len(a) == 6 and a.num_classes == 3
    assert (a.load_uint8(4) == b.load_uint8(4)).all()
    assert not (a.load_uint8(4) == c.load_uint8(4)).all()
    default = open_dataset("synthetic")
    assert (len(default), default.num_classes) == (480, 40)


def test_synthetic_identities_separable_by_pixels():
    """Nearest-neighbour on raw pixels beats chance by far: the data carries identity."""
    ds = open_dataset("synthetic:10:4:0", input_size=24)
    x = np.stack([ds.load_uint8(i).astype(np.float32).ravel() for i in range(len(ds))])
    x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    accuracy = (ds.labels[d.argmin(1)] == ds.labels).mean()
    assert accuracy > 0.3  # chance is 0.1


def test_normalize():
    import torch

    batch = torch.tensor([[[[0, 255]]] * 3], dtype=torch.uint8)
    out = normalize(batch, 127.5, 127.5)
    assert out.dtype == torch.float32 and out.min() == -1 and out.max() == 1


def _hand_rec(tmp_path, payloads, keys):
    rec = tmp_path / "train.rec"
    offsets, blob = [], b""
    for payload in payloads:
        offsets.append(len(blob))
        blob += frame_record(payload)
    rec.write_bytes(blob)
    (tmp_path / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in zip(keys, offsets)))
    return rec


def test_rec_meta_header_label_arrays_and_split_records(tmp_path):
    images = [_png((10, 20, 30)), _png((200, 100, 0)), _png((5, 5, 5))]
    # an image payload holding the magic word at an aligned offset -> written split (cflag 1/2/3)
    tricky = pack_header(1.0, images[1])
    pad = (-len(tricky)) % 4
    tricky_split = tricky + b"\0" * pad + MAGIC_BYTES + b"tail" + MAGIC_BYTES + b"more"
    framed = frame_record(tricky_split)
    assert framed.count(MAGIC_BYTES) == 3 and (struct.unpack_from("<I", framed, 4)[0] >> 29) == 1
    payloads = [
        pack_header([4.0, 6.0], b""),                    # meta header: images 1..3, identities 4..5
        pack_header([0.0, 7.0, 7.0], images[0]),          # flag 3 label array, identity = first entry
        tricky_split,
        pack_header(1.0, images[2]),
        pack_header([1.0, 2.0], b""), pack_header([2.0, 4.0], b""),
    ]
    rec = _hand_rec(tmp_path, payloads, range(6))
    assert RecordFile(rec).read(len(frame_record(payloads[0])) + len(frame_record(payloads[1])))[0] == tricky_split
    ds = open_dataset(f"rec:{rec}", input_size=8)
    assert ds.header == (4, 6) and list(ds.keys) == [1, 2, 3] and list(ds.labels) == [0, 1, 1]
    assert tuple(ds.load_uint8(0)[:, 0, 0]) == (10, 20, 30)
    assert tuple(ds.load_uint8(1)[:, 0, 0]) == (200, 100, 0)  # image decoded from the rejoined record


def test_rec_without_header_and_errors(tmp_path):
    payloads = [pack_header(float(i % 2), _png((i, i, i))) for i in range(4)]
    _hand_rec(tmp_path, payloads, range(4))
    ds = open_dataset(str(tmp_path), input_size=8)
    assert ds.header is None and list(ds.labels) == [0, 1, 0, 1]
    (tmp_path / "property").write_text("1,112,112\n")
    with pytest.raises(BadInputError, match=r"labels must lie in \[0, 1\)"):
        open_dataset(str(tmp_path))
    (tmp_path / "property").unlink()
    idx = (tmp_path / "train.idx").read_text()
    (tmp_path / "train.idx").write_text(idx + "9\t99999999\n")
    with pytest.raises(BadInputError, match="past the end"):
        open_dataset(str(tmp_path))
    (tmp_path / "train.idx").write_text(idx.replace("\t0\n", "\t4\n", 1))
    with pytest.raises(BadInputError, match="wrong magic"):
        open_dataset(str(tmp_path))
    (tmp_path / "train.idx").write_text(idx[:-3])  # truncated mid-number: offset no longer a record start
    with pytest.raises(BadInputError):
        open_dataset(str(tmp_path))[3]
    (tmp_path / "train.idx").unlink()  # missing .idx: rebuilt by scanning the .rec
    assert list(open_dataset(str(tmp_path)).labels) == [0, 1, 0, 1]


def test_pack_round_trip_png_pixel_exact(tmp_path):
    from shrinkcli.stages import data_tools

    source = open_dataset("synthetic:4:3:5", input_size=None)
    result = data_tools.run("pack", data="synthetic:4:3:5", output=str(tmp_path / "packed"), bin_pairs=10,
                            image_format="png", quality=95, seed=0)
    assert result["summary"]["images"] == 12
    assert (tmp_path / "packed" / "property").read_text().strip() == "4,128,128"
    packed = open_dataset(str(tmp_path / "packed"), input_size=None)
    assert packed.header is not None and list(packed.labels) == list(source.labels)
    for i in range(len(source)):
        assert (packed.load_uint8(i) == source.load_uint8(i)).all()
    pairs = load_pairs(str(tmp_path / "packed" / "verify.bin"), input_size=32)
    assert len(pairs) == 10 and pairs.issame.sum() == 5 and pairs.images.shape == (20, 3, 32, 32)
    summary = data_tools.run("inspect", data=str(tmp_path / "packed"), check_images=True)["summary"]
    assert summary["images"] == 12 and summary["corrupt"] == 0


def test_hf_save_to_disk_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    source = open_dataset("synthetic:3:2:0", input_size=16)
    rows = {"img": [{"bytes": source.encoded(i), "path": None} for i in range(len(source))],
            "who": [f"name{l}" for l in source.labels]}
    features = datasets.Features({"img": datasets.Image(), "who": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    ds = open_dataset(f"hf:{tmp_path / 'hf'}?image=img&label=who", input_size=16)
    assert ds.num_classes == 3 and list(ds.labels) == list(source.labels)
    assert all((ds.load_uint8(i) == source.load_uint8(i)).all() for i in range(len(ds)))
    clone = pickle.loads(pickle.dumps(ds))  # a DataLoader worker reopens the table itself
    assert clone._table is None and clone[5][1] == 2
    with pytest.raises(BadInputError, match="no column"):
        open_dataset(f"hf:{tmp_path / 'hf'}?image=nope")
    from shrinkcli.data import detect_kind

    assert detect_kind(tmp_path / "hf") == "hf"


def test_recordio_writer_streams_a_generator_and_checks_its_promises(tmp_path):
    pulled = []

    def samples():
        for label, colour in [(0, "red"), (0, "blue"), (1, "green"), (2, "white")]:
            pulled.append(label)
            yield label, _png(colour)

    stats = write_recordio(tmp_path / "rec", samples(), 3, lambda: (16, 20), count=4)
    assert stats["images"] == 4 and pulled == [0, 0, 1, 2]
    assert (tmp_path / "rec" / "property").read_text() == "3,20,16\n"
    data = open_dataset(f"rec:{tmp_path / 'rec'}", input_size=None)
    assert len(data) == 4 and list(data.labels) == [0, 0, 1, 2]
    with pytest.raises(ValueError, match="promised 5 samples and got 4"):
        write_recordio(tmp_path / "short", samples(), 3, (16, 20), count=5)
    with pytest.raises(ValueError, match="sorted by label"):
        write_recordio(tmp_path / "unsorted", iter([(1, _png("red")), (0, _png("red"))]), 2, (16, 20), count=2)
    assert not (tmp_path / "short" / "train.rec").exists()      # a failed write leaves no partial file
