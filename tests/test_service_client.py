"""ServiceClient against a real ``stealsim serve`` process (the session's ``victim_server``)."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from server_support import ADMIN_KEY, ServerProcess, free_port, json_request

from stealsim.errors import APIRequestError
from stealsim.service_client import ServiceClient
from stealsim.wire import API_KEY_HEADER, infer_path


def test_a_key_from_creation_to_revocation(victim_server: ServerProcess) -> None:
    with ServiceClient(victim_server.url, ADMIN_KEY) as service:
        service.wait_ready(30)
        assert service.is_ready()
        key = service.create_key(5, name="client/round-trip", models=["victim"], rate="100/second")
        assert key.api_key and key.key_id == key.listing["key_id"]
        assert key.listing["budget"] == 5 and key.listing["models"] == ["victim"]
        assert key.key_id in {listing["key_id"] for listing in service.list_keys()}

        images = np.zeros((3, 1, 8, 8), np.float32)
        answer = httpx.post(victim_server.url + infer_path("victim"), json=json_request(images),
                            headers={API_KEY_HEADER: key.api_key}, timeout=60)
        assert answer.status_code == 200, answer.text
        usage = service.usage(key.api_key)
        assert (usage["key_id"], usage["used"], usage["remaining"]) == (key.key_id, 3, 2)
        with ServiceClient(victim_server.url, key.api_key) as as_user:  # the client's own key
            assert as_user.usage()["used"] == 3

        assert service.top_up(key.key_id, 10)["budget"] == 15
        served = [record for record in service.audit() if record["key_id"] == key.key_id]
        assert [record["images"] for record in served] == [3]
        # No watermark step on this key: an empty record, still an .npz.
        empty = np.load(io.BytesIO(service.watermark_record(key.key_id, "victim")))
        assert len(empty["labels"]) == 0

        assert service.revoke(key.key_id)["revoked"] is True
        with pytest.raises(APIRequestError) as refused:
            service.usage(key.api_key)
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    assert "unknown or revoked API key" in str(refused.value)  # the server's own message


def test_refusals_carry_status_code_and_the_servers_message(victim_server: ServerProcess) -> None:
    with ServiceClient(victim_server.url, ADMIN_KEY) as service:
        with pytest.raises(APIRequestError) as unknown:
            service.watermark_record("key_nobody", "victim")
        assert (unknown.value.status, unknown.value.code) == (404, "key_not_found")
        with pytest.raises(APIRequestError) as invalid:
            service.create_key(5, policy=[{"name": "blur"}])
        assert (invalid.value.status, invalid.value.code) == (400, "invalid_request")
        assert "blur" in str(invalid.value)
    with ServiceClient(victim_server.url, "sk-not-the-admin") as stranger, pytest.raises(APIRequestError) as denied:
        stranger.list_keys()
    assert (denied.value.status, denied.value.code) == (403, "forbidden")
    assert "403 forbidden: this key is not the admin key" in str(denied.value)


def test_no_server_is_an_api_request_error_with_status_0() -> None:
    with ServiceClient(f"http://127.0.0.1:{free_port()}", ADMIN_KEY, timeout=5) as nobody:
        assert not nobody.is_ready()
        with pytest.raises(APIRequestError) as unreachable:
            nobody.usage("sk-anything")
        assert unreachable.value.status == 0 and "no answer" in str(unreachable.value)
        with pytest.raises(APIRequestError, match=r"not ready within 0\.3 s"):
            nobody.wait_ready(0.3, interval=0.05)
        with pytest.raises(APIRequestError, match="the server exited"):
            nobody.wait_ready(30, give_up=lambda: "the server exited")
