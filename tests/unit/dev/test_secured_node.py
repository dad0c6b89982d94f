"""A secured local node's server.properties (pipeline.dev.kafkanode.Secured): no listener
without authentication, the authorizer on, the stack's admin the only super user."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.dev.kafkanode import KafkaNode, Secured, server_properties

ADMIN_PASSWORD = "admin-pw-for-this-test"  # noqa: S105 - a test value


def test_a_secured_node_authenticates_every_listener(tmp_path: Path) -> None:
    node = KafkaNode(1, port=9001, controller_port=9002, home=tmp_path, tls_port=9003)
    secured = Secured(admin_password=ADMIN_PASSWORD, keystore=tmp_path / "broker.pem")
    props = server_properties(node, [node], secured=secured)
    protocols = dict(pair.split(":") for pair in props["listener.security.protocol.map"].split(","))
    listeners = [entry.split("://")[0] for entry in props["listeners"].split(",")]
    assert {name: protocols[name] for name in listeners} == {
        "INTERNAL": "SASL_PLAINTEXT", "CONTROLLER": "SASL_PLAINTEXT", "SECURE": "SASL_SSL"}
    assert "PLAINTEXT" not in protocols.values()
    assert props["advertised.listeners"] == "INTERNAL://127.0.0.1:9001,SECURE://127.0.0.1:9003"
    assert props["inter.broker.listener.name"] == "INTERNAL"
    assert props["listener.name.secure.sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["listener.name.secure.ssl.keystore.location"] == str(tmp_path / "broker.pem")
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["super.users"] == "User:admin"
    assert props["allow.everyone.if.no.acl.found"] == "false"
    # PLAIN on the node's own and the controller's listener knows the admin only.
    for listener in ("internal", "controller"):
        jaas = props[f"listener.name.{listener}.plain.sasl.jaas.config"]
        assert jaas.count("user_") == 1 and f'user_admin="{ADMIN_PASSWORD}"' in jaas
    assert secured.admin_properties().splitlines()[:2] == [
        "security.protocol=SASL_PLAINTEXT", "sasl.mechanism=PLAIN"]
    assert secured.admin_client_kwargs()["sasl_plain_password"] == ADMIN_PASSWORD
    with pytest.raises(ValueError, match="sasl_users"):
        server_properties(node, [node], secured=secured, sasl_users={"u": "p"})


def test_a_plain_node_has_no_authorizer(tmp_path: Path) -> None:
    node = KafkaNode(1, port=9001, controller_port=9002, home=tmp_path)
    props = server_properties(node, [node])
    assert "authorizer.class.name" not in props
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:9001,CONTROLLER://127.0.0.1:9002"
