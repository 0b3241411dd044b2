"""gRPC credentials from a startup kit: mutual TLS with the project's own CA.

Both ends present a certificate of the project's CA (``flkit provision``): the server proves
it is the project's server (its certificate names the host sites dial), a site proves which
site it is (the certificate's common name, which the server's interceptor takes as its
identity). Nothing else is trusted: not the system's CAs, not a certificate of another project.
"""

from __future__ import annotations

import grpc

from flkit.deploy.kit import Kit


def server_credentials(kit: Kit) -> grpc.ServerCredentials:
    """The server's side: its own key pair; every client must present a certificate of the CA."""
    return grpc.ssl_server_credentials([(kit.key_pem, kit.cert_pem)], root_certificates=kit.ca_pem,
                                       require_client_auth=True)


def channel_credentials(kit: Kit) -> grpc.ChannelCredentials:
    """A site's (or admin's) side: trust only the project's CA, and present this kit's certificate."""
    return grpc.ssl_channel_credentials(root_certificates=kit.ca_pem, private_key=kit.key_pem,
                                        certificate_chain=kit.cert_pem)


def server_host(kit: Kit) -> str:
    """The host name the project's server certificate was made for (from the kit's ``server``)."""
    host = kit.server.rsplit(":", 1)[0] if ":" in kit.server else kit.server
    return host.strip("[]")


def channel_options(kit: Kit) -> list[tuple[str, str]]:
    """Check the server's certificate against the host name the project provisioned it for, even
    when sites dial another name or an address for it (a load balancer, an IP, a tunnel)."""
    return [("grpc.ssl_target_name_override", server_host(kit))]


def explain_handshake_failure(details: str) -> str | None:
    """A sentence for a site's error when a call failed in the TLS handshake (None otherwise).
    A server that refuses the site's certificate closes the connection during the handshake (TLS
    1.3 tells the client no more than that); a server certificate of another CA fails the site's
    own check."""
    text = details.lower()
    if "handshake" in text or "ssl" in text or "certificate" in text:
        return ("the TLS handshake failed: the server's certificate is not from this kit's CA, or does not "
                "name the host dialled (is the kit from the same `flkit provision` as the server's?)")
    if "socket closed" in text:
        return ("the server closed the connection: if this repeats, it does not accept this site's certificate "
                "in the TLS handshake (a kit of another project or CA, or an expired certificate) or it does not "
                "speak TLS (started with --insecure?); once, it may have been restarting")
    return None
