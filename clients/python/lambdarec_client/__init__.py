"""lambdarec's light Python client: `Client` over the gRPC API, and the CLI
(`python -m lambdarec_client`). Depends on grpcio and protobuf only."""

from lambdarec_client.client import Client, make_event, to_dict

__all__ = ["Client", "make_event", "to_dict"]
