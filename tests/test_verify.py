"""evgw verify: hash chain and signature checks on records sealed by gateway.records.seal with a
real Ed25519 Signer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.billing.signing import Signer
from gateway.billing.verify import read_records, verify_records
from gateway.cli import main
from gateway.records import seal
from tests.support.consumer import make_chain, make_signer, tampered


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return make_signer(tmp_path)


@pytest.fixture
def public(signer: Signer):  # type: ignore[no-untyped-def]
    return signer._private.public_key()


def test_intact_chain_passes(signer: Signer, public) -> None:  # type: ignore[no-untyped-def]
    chain = make_chain(8, signer)
    result = verify_records(chain, public, complete=True)
    assert result.ok, result.problems
    assert result.checked == 8
    assert result.signatures_checked == 8
    assert result.summary() == "8 records OK, chain intact, signatures valid"


def test_without_key_signatures_are_not_claimed(signer: Signer) -> None:
    result = verify_records(make_chain(3, signer))
    assert result.ok
    assert result.summary() == "3 records OK, chain intact, signatures not checked (no public key)"


def test_tampered_field_is_named(signer: Signer, public) -> None:  # type: ignore[no-untyped-def]
    chain = make_chain(6, signer)
    chain[3] = tampered(chain[3], energy_wh=2200)  # seq 4, hash left as it was
    result = verify_records(chain, public)
    assert not result.ok
    sid = chain[3]["session_id"]
    # the signature still matches the stated hash: only the content check catches it
    assert result.problems == [f"seq 4 (session {sid}): hash does not match its content"]


def test_tampered_and_rehashed_breaks_signature_and_link(signer: Signer, public) -> None:  # type: ignore[no-untyped-def]
    chain = make_chain(6, signer)
    forged = tampered(chain[2], energy_wh=1)
    forged = seal(forged)  # re-hashed by someone without the key: signature dropped
    forged["signature"] = chain[2]["signature"]  # and the old signature pasted back
    chain[2] = forged
    result = verify_records(chain, public)
    s3, s4 = chain[2]["session_id"], chain[3]["session_id"]
    assert result.problems == [
        f"seq 3 (session {s3}): signature does not verify",
        f"seq 4 (session {s4}): prev_hash does not match the hash of seq 3 "
        "(a record was changed and re-hashed, or replaced)",
    ]


def test_deleted_record_is_a_gap(signer: Signer, public) -> None:  # type: ignore[no-untyped-def]
    chain = make_chain(8, signer)
    del chain[4:6]  # seq 5 and 6
    result = verify_records(chain, public)
    assert result.problems == ["missing record(s) between seq 4 and seq 7"]


def test_deleted_first_record_only_matters_for_a_whole_buffer(signer: Signer) -> None:
    chain = make_chain(4, signer)[1:]
    assert verify_records(chain).ok  # an extract may start anywhere
    assert verify_records(chain, complete=True).problems == ["missing record(s) before seq 2"]


def test_swapped_records_are_out_of_order(signer: Signer, public) -> None:  # type: ignore[no-untyped-def]
    chain = make_chain(6, signer)
    chain[2], chain[3] = chain[3], chain[2]
    result = verify_records(chain, public)
    sid = chain[3]["session_id"]  # seq 3, now after seq 4
    assert result.problems == [
        f"seq 3 (session {sid}): out of order (comes after seq 4; "
        "the chain links are right in seq order)"
    ]


def test_forged_signature_is_detected(signer: Signer, public, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    chain = make_chain(5, signer)
    other = make_signer(tmp_path, "other.key")
    chain[1] = dict(chain[1], signature=other.sign(chain[1]["hash"].encode()))
    chain[1]["signature"]["key_id"] = signer.key_id  # claims to be the site's key
    result = verify_records(chain, public)
    sid = chain[1]["session_id"]
    assert result.problems == [f"seq 2 (session {sid}): signature does not verify"]


def test_unsigned_record_with_key_given(signer: Signer, public) -> None:  # type: ignore[no-untyped-def]
    chain = make_chain(3, signer)
    chain[2] = {k: v for k, v in chain[2].items() if k != "signature"}
    result = verify_records(chain, public)
    assert result.problems == [f"seq 3 (session {chain[2]['session_id']}): not signed"]


def test_duplicates(signer: Signer) -> None:
    chain = make_chain(3, signer)
    changed = tampered(chain[1], stop_reason="remote")
    result = verify_records([*chain, chain[1], changed])
    sid = chain[1]["session_id"]
    assert result.problems == [
        f"seq 2 (session {sid}): hash does not match its content",  # the changed copy
        f"seq 2 (session {sid}): duplicate (the same record appears twice)",
        f"seq 2 (session {sid}): session {sid} appears twice with different content",
    ]


def test_two_sites_are_separate_chains(signer: Signer) -> None:
    a = make_chain(3, signer, site="a")
    b = make_chain(2, signer, site="b")
    assert verify_records([*a, *b]).ok
    del a[1]
    assert verify_records([*a, *b]).problems == [
        "site a: missing record(s) between seq 1 and seq 3"
    ]


def test_read_records_accepts_lines_and_arrays(signer: Signer) -> None:
    chain = make_chain(2, signer)
    assert read_records("\n".join(json.dumps(r) for r in chain) + "\n\n") == chain
    assert read_records(json.dumps(chain)) == chain


# ------------------------------------------------------------------ the command line


def _write_lines(path: Path, records: list[dict]) -> Path:  # type: ignore[type-arg]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cli_verify_file_ok(
    signer: Signer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chain = make_chain(5, signer)
    records = _write_lines(tmp_path / "records.jsonl", chain)
    pub = tmp_path / "site.pub"
    pub.write_text(signer.public_pem())
    assert main(["verify", "--file", str(records), "--key", str(pub)]) == 0
    assert capsys.readouterr().out == "5 records OK, chain intact, signatures valid\n"
    # the gateway's private key file works as --key too (its public half is used)
    assert main(["verify", "--file", str(records), "--key", str(signer.path)]) == 0


def test_cli_verify_file_problems(
    signer: Signer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chain = make_chain(6, signer)
    chain[0] = tampered(chain[0], user={**chain[0]["user"], "id": "mallory"})
    del chain[3]
    records = tmp_path / "records.json"
    records.write_text(json.dumps(chain))
    assert main(["verify", "--file", str(records)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"seq 1 (session {chain[0]['session_id']}): hash does not match its content",
        "missing record(s) between seq 3 and seq 5",
        "2 problem(s) in 5 records",
    ]


def test_cli_verify_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"seq": 1}\nnot json\n')
    assert main(["verify", "--file", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl:2: not JSON" in err
    assert "Traceback" not in err


async def test_verify_gateway_buffer_with_its_own_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """-c CONFIG: the records sealed by the real Store, and the key file next to the buffer."""
    import sqlite3

    from gateway.billing.verify import run_verify
    from gateway.config import load_config
    from gateway.store import Store
    from tests.support.consumer import unsealed_body

    cfg_path = tmp_path / "site.yaml"
    buffer = tmp_path / "buffer.db"
    cfg_path.write_text(
        f"site: {{id: depot-7, timezone: Europe/Berlin}}\nstorage: {{path: {buffer}}}\n"
    )
    config = load_config(cfg_path)
    signer = Signer.load_or_create(buffer.with_name("evgw-signing.key"))
    async with Store.open(
        buffer,
        site_id="depot-7",
        reserve_bytes=0,
        sealer=lambda r, seq, prev: r.sealed(seq, prev, signer.sign),
    ) as store:
        for i in range(1, 5):
            await store.finish_session(unsealed_body(i))
    assert await run_verify(config=config) == 0
    assert capsys.readouterr().out == "4 records OK, chain intact, signatures valid\n"

    # someone edits the buffer behind the gateway's back
    with sqlite3.connect(buffer) as db:
        (text,) = db.execute("SELECT record FROM finished_sessions WHERE seq = 2").fetchone()
        rec = json.loads(text)
        rec["cost"]["incl_vat"] = "0.01"
        db.execute("UPDATE finished_sessions SET record = ? WHERE seq = 2", (json.dumps(rec),))
    assert await run_verify(config=load_config(cfg_path)) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"seq 2 (session {rec['session_id']}): hash does not match its content",
        "1 problem(s) in 4 records",
    ]
