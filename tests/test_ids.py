"""Record ids and fingerprints, byte-identical to the Rust module's.

The expected values were computed outside Python, with the framing written in shell
(``printf '%016x' LEN | xxd -r -p; printf '%s' PART`` per part, piped into ``sha256sum``),
so these vectors check the algorithm, not the implementation against itself.
"""

from __future__ import annotations

import pytest

from idemstore import TenantContext, TenantSource, idempotency_fingerprint, idempotency_record_id

FORMAT_MD_KEY = "trigger:whtr_0123456789abcdef0123456789abcdef:provider_event:evt_123"


def test_format_md_vector():
    assert (
        idempotency_record_id(
            TenantContext.local_implicit(), "webhook.provider_event", FORMAT_MD_KEY
        )
        == "idem_79ff466be32b62424b02f1333fcfd686707e4a20e306918221582d30b9bab661"
    )


@pytest.mark.parametrize(
    ("tenant", "operation", "key", "expected"),
    [
        (
            TenantContext("org-a", "workspace-a"),
            "outbox.send",
            "send-1",
            "idem_bf68329c2948b819ff11c91b6c12c70559fca3c970675f11319047f792a17159",
        ),
        (
            TenantContext("org-a", "workspace-a", "dep-1"),
            "outbox.send",
            "send-1",
            "idem_fee2bd142b391d33042ec19d85d873337a24fbf5378feef885bf8e06ef552fba",
        ),
        (
            TenantContext("Zürich", "工作区"),
            "op.ünïcode",
            "ключ-🔑",
            "idem_244b997b0ee3e106e2470e6ce3b1be9039628df7401d8c0885a34b1f0b45af21",
        ),
        (
            TenantContext("", ""),
            "",
            "",
            "idem_2c34ce1df23b838c5abf2a7f6437cca3d3067ed509ff25f11df6b11b582b51eb",
        ),
    ],
)
def test_record_id_vectors(tenant, operation, key, expected):
    assert idempotency_record_id(tenant, operation, key) == expected


def test_actor_and_source_are_not_part_of_the_id():
    plain = TenantContext("org-a", "workspace-a")
    explicit = TenantContext.explicit_user_workspace("org-a", "workspace-a", None, "someone")
    assert explicit.source is TenantSource.EXPLICIT
    assert idempotency_record_id(plain, "op", "k") == idempotency_record_id(explicit, "op", "k")


def test_empty_and_absent_deployment_hash_alike_but_differ_from_a_value():
    absent = TenantContext("org-a", "workspace-a", None)
    empty = TenantContext("org-a", "workspace-a", "")
    valued = TenantContext("org-a", "workspace-a", "dep-1")
    assert idempotency_record_id(absent, "op", "k") == idempotency_record_id(empty, "op", "k")
    assert idempotency_record_id(absent, "op", "k") != idempotency_record_id(valued, "op", "k")


def test_length_prefix_separates_parts():
    # "a"+"b" and "ab" would collide without the length prefix.
    assert idempotency_record_id(TenantContext("a", "b"), "c", "d") != idempotency_record_id(
        TenantContext("ab", ""), "c", "d"
    )


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        ([], "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
        ([""], "sha256:af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"),
        (["a", "b"], "sha256:3c9d591045bc8876f9d0399bbfb05c6a412096e906f73278f98406cd5dca86df"),
        (["ab"], "sha256:9caccc24b5d7e06c21c0277b6530d66664273e11f326515c58eaa3691afccfff"),
        (
            ["trigger:whtr_1", "evt_123", "🔑"],
            "sha256:edfc3860bae951e0b0244c01649497f9b1966222fba4774ce6bcc6243ae89ca3",
        ),
    ],
)
def test_fingerprint_vectors(parts, expected):
    assert idempotency_fingerprint(parts) == expected
    assert idempotency_fingerprint(iter(parts)) == expected  # any iterable


def test_lone_surrogate_is_invalid_input():
    from idemstore import InvalidInputError

    with pytest.raises(InvalidInputError, match="lone surrogate"):
        idempotency_fingerprint(["ok", "\ud800"])


def test_cached_tenant_prefix_gives_each_key_its_own_id():
    # Ids share a hash of (org, workspace, deployment, operation); keys must not leak into it.
    t = TenantContext("org-a", "workspace-a")
    for _ in range(2):
        assert idempotency_record_id(t, "outbox.send", "send-1") == (
            "idem_bf68329c2948b819ff11c91b6c12c70559fca3c970675f11319047f792a17159"
        )
        assert idempotency_record_id(t, "outbox.send", "send-2") == (
            "idem_b4b1d48578fc654ae1b391531151952d229d829b911855d7f67d9b65c4e73c6d"
        )
