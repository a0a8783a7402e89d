"""Image and label files checked before their voxels are read: type, size, integrity, geometry.

- only NIfTI (.nii, .nii.gz, single-file `n+1` / `n+2`) and NRRD with attached data (no `data file`
  field, raw or gzip encoding) are read; detached data (.hdr/.img pairs, .nhdr, .mhd) is refused;
- the voxel count comes from the header (`max_voxels`, `--conf max_voxels`) before any voxel is read;
- the data is streamed once, in chunks: a file cut short (truncated gzip or raw data) or holding
  NaN / infinite values is refused (SimpleITK would read zeros for both);
- a label must have its image's size, spacing, origin and direction (within `GEOMETRY_TOL`).
Errors are `ClientError` 4xx answers naming the file by its base name only.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from lib.server.validate import ClientError

DEFAULT_MAX_VOXELS = 512 * 512 * 1024     # 268 M voxels: a 512 x 512 CT of 1024 slices
GEOMETRY_TOL = 1e-3                        # relative to the voxel spacing (origin) / absolute (direction)
CHUNK = 1 << 22
NRRD_TYPES = {"uchar": "u1", "unsignedchar": "u1", "uint8": "u1", "uint8_t": "u1", "signedchar": "i1",
              "int8": "i1", "int8_t": "i1", "short": "i2", "shortint": "i2", "signedshort": "i2",
              "signedshortint": "i2", "int16": "i2", "int16_t": "i2", "ushort": "u2", "unsignedshort": "u2",
              "unsignedshortint": "u2", "uint16": "u2", "uint16_t": "u2", "int": "i4", "signedint": "i4",
              "int32": "i4", "int32_t": "i4", "uint": "u4", "unsignedint": "u4", "uint32": "u4",
              "uint32_t": "u4", "longlong": "i8", "longlongint": "i8", "signedlonglong": "i8",
              "signedlonglongint": "i8", "int64": "i8", "int64_t": "i8", "ulonglong": "u8",
              "unsignedlonglong": "u8", "unsignedlonglongint": "u8", "uint64": "u8", "uint64_t": "u8",
              "float": "f4", "double": "f8"}


def _name(path) -> str:
    return Path(str(path)).name


def _kind(path: str) -> str:
    low = path.lower()
    if low.endswith((".nii", ".nii.gz")):
        return "nifti"
    if low.endswith(".nrrd"):
        return "nrrd"
    raise ClientError(f"{_name(path)}: unsupported file type (NIfTI .nii / .nii.gz or NRRD .nrrd only)", 415)


def _nrrd_header(path: str) -> tuple[dict, int]:
    """NRRD header fields (lower-case keys) and the byte offset of its data."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.startswith(b"NRRD"):
        raise ClientError(f"{_name(path)} is not a NRRD file")
    end = head.find(b"\n\n")
    if end < 0:
        raise ClientError(f"{_name(path)}: NRRD header has no end (or is longer than 64 KiB)")
    fields = {}
    for line in head[:end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":=" in line.split(":", 1)[0]:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    return fields, end + 2


class Header:
    """What the header of one file says (read with SimpleITK's ImageIO, no voxel read)."""

    def __init__(self, path: str):
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise ClientError(f"cannot read {_name(path)}: not a valid image header") from None
        self.size = tuple(int(s) for s in reader.GetSize())
        self.spacing = tuple(reader.GetSpacing())
        self.origin = tuple(reader.GetOrigin())
        self.direction = tuple(reader.GetDirection())
        self.components = int(reader.GetNumberOfComponents())
        self.voxels = int(np.prod(self.size, dtype=np.float64)) * self.components


def _nifti_layout(path: str) -> tuple[int, np.dtype, bool]:
    """(data offset, dtype, gzip) of a single-file NIfTI; pair (.hdr/.img) files are refused."""
    import nibabel as nib

    try:
        img = nib.load(path)
    except Exception as err:  # noqa: BLE001 - any header nibabel cannot parse is the client's file
        raise ClientError(f"cannot read {_name(path)}: {type(err).__name__}") from None
    magic = bytes(np.asarray(img.header.get("magic", b""))).rstrip(b"\x00")
    if magic not in (b"n+1", b"n+2"):
        raise ClientError(f"{_name(path)}: detached NIfTI data ({magic!r}, .hdr/.img pair) is not accepted")
    offset = max(int(img.header.get_data_offset()), int(img.header.sizeof_hdr) + 4)
    return offset, img.header.get_data_dtype(), path.lower().endswith(".gz")


def _nrrd_layout(path: str) -> tuple[int, np.dtype, bool]:
    fields, offset = _nrrd_header(path)
    if any(k in fields for k in ("data file", "datafile")):
        raise ClientError(f"{_name(path)}: detached NRRD data ('data file') is not accepted")
    encoding = fields.get("encoding", "raw").lower()
    if encoding not in ("raw", "gzip", "gz"):
        raise ClientError(f"{_name(path)}: NRRD encoding {encoding!r} is not accepted (raw or gzip)")
    code = NRRD_TYPES.get(fields.get("type", "").lower().replace(" ", ""))
    if code is None:
        raise ClientError(f"{_name(path)}: NRRD type {fields.get('type')!r} is not accepted")
    dtype = np.dtype(("<" if fields.get("endian", "little").lower() != "big" else ">") + code)
    return offset, dtype, encoding != "raw"


def _scan(path: str, offset: int, dtype: np.dtype, compressed: bool, nbytes: int) -> None:
    """Stream the voxel data once: refuse a file cut short, and NaN / inf in float data."""
    floating = dtype.kind == "f"
    seen, carry = 0, b""
    try:
        if compressed and path.lower().endswith(".nii.gz"):
            stream = gzip.open(path, "rb")
            stream.seek(offset)
        else:
            stream = open(path, "rb")
            stream.seek(offset)
            if compressed:   # NRRD gzip: the data after the header is one gzip stream
                stream = gzip.GzipFile(fileobj=stream, mode="rb")
        with stream:
            while seen < nbytes:
                chunk = stream.read(min(CHUNK, nbytes - seen))
                if not chunk:
                    break
                seen += len(chunk)
                if floating:
                    buf = carry + chunk
                    usable = len(buf) - len(buf) % dtype.itemsize
                    if not np.isfinite(np.frombuffer(buf[:usable], dtype=dtype)).all():
                        raise ClientError(f"{_name(path)} holds NaN or infinite values")
                    carry = buf[usable:]
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as err:
        if isinstance(err, ClientError):
            raise
        raise ClientError(f"{_name(path)} is damaged or cut short ({type(err).__name__})") from None
    if seen < nbytes:
        raise ClientError(f"{_name(path)} is cut short: {seen} of {nbytes} data bytes")


def check_file(path, max_voxels: int = DEFAULT_MAX_VOXELS, what: str = "image") -> Header:
    """Refuse what the module docstring lists; -> the file's Header. A folder (DICOM series) passes."""
    path = str(path)
    if os.path.isdir(path):
        return None
    if not os.path.isfile(path):
        raise ClientError(f"{what} file {_name(path)} not found", 404)
    kind = _kind(path)
    if kind == "nrrd":   # refuse detached data before ITK opens anything it names
        fields, _ = _nrrd_header(path)
        if any(k in fields for k in ("data file", "datafile")):
            raise ClientError(f"{_name(path)}: detached NRRD data ('data file') is not accepted")
    else:
        _nifti_layout(path)
    header = Header(path)
    if header.voxels > max_voxels:
        raise ClientError(f"{what} {_name(path)} has {header.voxels:,} voxels {header.size}: more than this "
                          f"server accepts (max_voxels {max_voxels:,})", 413)
    offset, dtype, compressed = _nifti_layout(path) if kind == "nifti" else _nrrd_layout(path)
    _scan(path, offset, dtype, compressed, header.voxels * dtype.itemsize)
    return header


def check_same_grid(label: Header, image: Header, what: str = "annotation") -> None:
    """A label must lie on its image's voxel grid: same size, spacing, origin and direction."""
    if label is None or image is None:
        return
    if len(label.size) == 4 and label.size[3] == 1:
        label_size = label.size[:3]
    else:
        label_size = label.size
    image_size = image.size[:3] if len(image.size) == 4 and image.size[3] == 1 else image.size
    if tuple(label_size) != tuple(image_size):
        raise ClientError(f"{what} shape {tuple(label_size)} differs from the image shape {tuple(image_size)}")
    n = min(len(label.spacing), len(image.spacing), 3)
    sp_l, sp_i = np.array(label.spacing[:n]), np.array(image.spacing[:n])
    if not np.allclose(sp_l, sp_i, rtol=GEOMETRY_TOL, atol=0):
        raise ClientError(f"{what} spacing {tuple(np.round(sp_l, 4))} differs from the image's {tuple(np.round(sp_i, 4))}")
    org_l, org_i = np.array(label.origin[:n]), np.array(image.origin[:n])
    if np.abs(org_l - org_i).max() > GEOMETRY_TOL * max(float(sp_i.min()), 1e-3) + 1e-4:
        raise ClientError(f"{what} origin {tuple(np.round(org_l, 3))} mm differs from the image's "
                          f"{tuple(np.round(org_i, 3))} mm")
    dir_l = np.array(label.direction).reshape(len(label.size), -1)[:n, :n]
    dir_i = np.array(image.direction).reshape(len(image.size), -1)[:n, :n]
    if np.abs(dir_l - dir_i).max() > GEOMETRY_TOL:
        raise ClientError(f"{what} direction (orientation) {tuple(np.round(dir_l.ravel(), 3))} differs from the "
                          f"image's {tuple(np.round(dir_i.ravel(), 3))}")
