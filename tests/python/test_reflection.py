"""gRPC server reflection and health as generic gRPC tools see them: a real reflection client
(grpcio-reflection) lists the daemon's services and describes every method from the
descriptors it downloads; grpcio-health-checking's stub checks health; both can be turned off."""

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)

METHODS = {
    "Attach": ("AttachRequest", "AttachResponse", False),
    "Heartbeat": ("HeartbeatRequest", "HeartbeatResponse", False),
    "Detach": ("DetachRequest", "DetachResponse", False),
    "Allocate": ("AllocateRequest", "AllocateResponse", False),
    "Free": ("FreeRequest", "FreeResponse", False),
    "Fork": ("ForkRequest", "ForkResponse", False),
    "Step": ("StepRequest", "StepResponse", False),
    "GetSequence": ("GetSequenceRequest", "GetSequenceResponse", False),
    "ListSequences": ("ListSequencesRequest", "ListSequencesResponse", False),
    "Stats": ("StatsRequest", "StatsResponse", False),
    "Watch": ("WatchRequest", "Event", True),
    "Compress": ("CompressRequest", "CompressResponse", False),
    "FinishCompress": ("FinishCompressRequest", "CompressResponse", False),
    "Fetch": ("FetchRequest", "FetchResponse", False),
    "Park": ("ParkRequest", "ParkResponse", False),
    "StorePrefix": ("StorePrefixRequest", "StorePrefixResponse", False),
    "MatchPrefix": ("MatchPrefixRequest", "MatchPrefixResponse", False),
    "LoadPrefix": ("LoadPrefixRequest", "LoadPrefixResponse", False),
    "ListPeers": ("ListPeersRequest", "ListPeersResponse", False),
    "TransferSequence": ("TransferSequenceRequest", "TransferSequenceResponse", False),
}


def test_reflection_lists_services_and_describes_methods(daemon):
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"cachemgr.v1.CacheManager", "cachemgr.v1.Peer", "grpc.health.v1.Health"} <= services
        assert any(s.startswith("grpc.reflection.") for s in services)

        pool = DescriptorPool(db)
        service = pool.FindServiceByName("cachemgr.v1.CacheManager")
        described = {m.name: (m.input_type.name, m.output_type.name, m.server_streaming)
                     for m in service.methods}
        assert described == METHODS
        peer = pool.FindServiceByName("cachemgr.v1.Peer")
        assert {m.name: (m.input_type.name, m.output_type.name, m.client_streaming)
                for m in peer.methods} == {
            "Hello": ("HelloRequest", "HelloResponse", False),
            "ReceiveSequence": ("SequenceChunk", "ReceiveSequenceResponse", True)}
        # Message descriptors come along: the request fields callers must fill.
        compress = pool.FindMessageTypeByName("cachemgr.v1.CompressRequest")
        assert {"session_token", "sequence_id", "policy", "reserve_ratio", "byte_ratio",
                "input", "num_queries"} <= {f.name for f in compress.fields}
        assert [f.name for f in compress.oneofs_by_name["target"].fields] == [
            "reserve_ratio", "byte_ratio"]
        spec = pool.FindMessageTypeByName("cachemgr.v1.ModelSpec")
        assert "num_kv_heads" in spec.fields_by_name


def test_health_check_with_the_standard_stub(daemon):
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "cachemgr.v1.CacheManager"):
            r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_and_health_can_be_turned_off(daemon_factory):
    d = daemon_factory("--reflection=false", "--health=false")
    with grpc.insecure_channel(f"unix:{d.socket}") as channel:
        with pytest.raises(grpc.RpcError) as e:
            list(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
