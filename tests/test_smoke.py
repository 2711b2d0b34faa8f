import grpc

from jobstate.v1 import job_state_service_pb2 as spb
from jobstate.v1 import job_state_service_pb2_grpc as spb_grpc


def test_create_and_get_over_a_real_socket(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        created = stub.CreateJob(spb.CreateJobRequest(job_id="smoke"))
        got = stub.GetJob(spb.GetJobRequest(job_id="smoke"))
    assert created.job.version == 1
    assert got.job == created.job
    assert got.revision == created.revision == 1
