"""`tmem serve` configuration (TOML + CLI overrides) and the stats renderers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tmem import ConfigError
from tmem.nbd.config import Address, load_config
from tmem.nbd.httpstats import render_json, render_metrics


def test_defaults() -> None:
    cfg = load_config()
    assert [str(a) for a in cfg.listen] == ["127.0.0.1:10809"]
    assert cfg.size == 1 << 30
    assert cfg.compressor == "lz4"
    assert cfg.backing is None
    assert cfg.stats is None
    assert cfg.compress_behind is True
    assert (cfg.allocator, cfg.prefault, cfg.recompress) == ("zsmalloc", False, None)
    assert cfg.recompress_after == 30.0
    assert cfg.arena_prefault is False


def test_store_options_from_toml_then_cli(tmp_path: Path) -> None:
    f = tmp_path / "serve.toml"
    f.write_text(
        'allocator = "zbud"\nprefault = true\nrecompress = "zstd-3"\nrecompress-after = "2m"\n'
    )
    cfg = load_config(f)
    assert (cfg.allocator, cfg.prefault, cfg.recompress) == ("zbud", True, "zstd-3")
    assert cfg.recompress_after == 120.0
    cfg = load_config(f, {"allocator": "zsmalloc", "recompress_after": "500ms"})
    assert (cfg.allocator, cfg.recompress_after) == ("zsmalloc", 0.5)
    f.write_text('recompress = "off"\nrecompress_after = 45\n')
    cfg = load_config(f)
    assert (cfg.recompress, cfg.recompress_after) == (None, 45.0)
    assert load_config(None, {"recompress_after": "1h"}).recompress_after == 3600.0
    assert load_config(None, {"recompress_after": "7.5"}).recompress_after == 7.5


def test_mlock_implies_prefault() -> None:
    """mlockall faults the whole arena in and refuses to give locked pages back, so an
    mlocked server's budget is resident either way: say so rather than pretend."""
    cfg = load_config(None, {"mlock": True})
    assert cfg.prefault is False and cfg.arena_prefault is True


def test_compress_behind_from_toml_and_cli(tmp_path: Path) -> None:
    f = tmp_path / "serve.toml"
    f.write_text("compress-behind = false\n")
    assert load_config(f).compress_behind is False
    assert load_config(f, {"compress_behind": True}).compress_behind is True
    f.write_text("compress_behind = true\n")
    assert load_config(f, {"compress_behind": None}).compress_behind is True


def test_toml_then_cli_overrides(tmp_path: Path) -> None:
    f = tmp_path / "serve.toml"
    f.write_text(
        'listen = ["127.0.0.1:0", "unix:/tmp/x.sock"]\nsize = "64MiB"\nmemory = "8MiB"\n'
        'compressor = "zstd"\nexport-name = "swap"\nmlock = false\n[cluster]\nnodes = 3\n'
    )
    cfg = load_config(f, {"memory": "16MiB", "compressor": None, "listen": ()})
    assert cfg.size == 64 << 20
    assert cfg.memory == 16 << 20  # CLI wins
    assert cfg.compressor == "zstd"  # not given on the CLI: file wins
    assert cfg.export_name == "swap"
    assert cfg.listen[1].path == "/tmp/x.sock"
    assert cfg.listen[0].port == 0


def test_serve_section_is_accepted(tmp_path: Path) -> None:
    f = tmp_path / "serve.toml"
    f.write_text('[serve]\nsize = "8MiB"\n')
    assert load_config(f).size == 8 << 20


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("sise = 1\n", "unknown key"),
        ('size = "lots"\n', "not a size"),
        ("size = 1000\n", "multiple of 4 KiB"),
        ('compressor = "gzip"\n', "unknown compressor"),
        ('listen = "nohostport"\n', "HOST:PORT"),
        ("mlock = 1\n", "true or false"),
        ('compress-behind = "yes"\n', "compress-behind must be true or false"),
        ("size = [\n", "not valid TOML"),
        ('allocator = "slab"\n', "unknown allocator 'slab'"),
        ('recompress = "gzip"\n', "--recompress: unknown compressor 'gzip'"),
        ('recompress = "zstd-99"\n', "--recompress: unknown compressor"),
        ('recompress-after = "-5s"\n', "must not be negative"),
        ("recompress-after = -1\n", "must not be negative"),
        ('recompress-after = "soon"\n', "not a duration"),
        ('recompress-after = "3d"\n', "unknown duration unit"),
        ("recompress-after = true\n", "recompress-after must be a duration"),
        ('prefault = "yes"\n', "prefault must be true or false"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, text: str, msg: str) -> None:
    f = tmp_path / "serve.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=msg):
        load_config(f)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config("/nonexistent/serve.toml")


def test_address_parse() -> None:
    assert str(Address.parse("[::1]:10809")) == "[::1]:10809"
    assert Address.parse(":99").host == "127.0.0.1"
    with pytest.raises(ConfigError):
        Address.parse("unix:")
    with pytest.raises(ConfigError):
        Address.parse("host:99999")


def _snapshot() -> dict[str, dict[str, int | float]]:
    return {
        "zcache": {"frames_total": 16, "puts": 7},
        "blockdev": {
            "blockdev_read_bytes": 4096,
            "blockdev_backing_pages": 2,
            "blockdev_staged_pages": 5,
        },
        "server": {"server_connections": 1, "server_bad_clients": 3},
    }


def test_metrics_text_has_counters_and_gauges() -> None:
    text = render_metrics(_snapshot()).decode()
    assert "# TYPE tmem_blockdev_read_bytes_total counter" in text
    assert "tmem_blockdev_read_bytes_total 4096.0" in text
    assert "# TYPE tmem_blockdev_backing_pages gauge" in text
    assert "# TYPE tmem_blockdev_staged_pages gauge" in text  # falls as pages compact
    # zcache's names do not say counter or level: exported untyped
    assert "# TYPE tmem_zcache_frames_total untyped" in text
    assert "tmem_zcache_puts 7.0" in text
    assert "tmem_server_bad_clients_total 3.0" in text


def test_stats_json_sections() -> None:
    data = json.loads(render_json(_snapshot()))
    assert data["blockdev"]["blockdev_read_bytes"] == 4096
    assert set(data) == {"zcache", "blockdev", "server"}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), ("45", 45.0), ("1.5", 1.5)],
)
def test_durations(text: str, seconds: float) -> None:
    from tmem.sizes import parse_duration

    assert parse_duration(text) == seconds
