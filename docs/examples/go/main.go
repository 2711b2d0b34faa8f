package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	jobstatev1 "example.com/myapp/gen/jobstate/v1"
)

func main() {
	target := os.Getenv("JOBSTATE_TARGET")
	if target == "" {
		target = "127.0.0.1:50051"
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	c := jobstatev1.NewJobStateServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	created, err := c.CreateJob(ctx, &jobstatev1.CreateJobRequest{JobId: "go-1"})
	if err != nil {
		log.Fatal(err)
	}
	// From the create's revision: every change of the job, none missed.
	stream, err := c.Watch(ctx, &jobstatev1.WatchRequest{JobIds: []string{"go-1"}, StartRevision: created.Revision})
	if err != nil {
		log.Fatal(err)
	}

	_, err = c.UpdateJobState(ctx, &jobstatev1.UpdateJobStateRequest{
		JobId:     "go-1",
		NewState:  jobstatev1.JobStateType_JOB_STATE_TYPE_QUEUED,
		Condition: &jobstatev1.JobCondition{ExpectedVersion: created.Job.Version},
	})
	if err != nil {
		log.Fatal(err)
	}

	// A stale version: ABORTED, with an ErrorInfo whose reason a program can switch on.
	_, err = c.UpdateJobState(ctx, &jobstatev1.UpdateJobStateRequest{
		JobId:     "go-1",
		NewState:  jobstatev1.JobStateType_JOB_STATE_TYPE_IN_PROGRESS,
		Condition: &jobstatev1.JobCondition{ExpectedVersion: 1},
	})
	st := status.Convert(err)
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			fmt.Println(st.Code(), info.Reason, info.Metadata["current_version"]) // Aborted VERSION_MISMATCH 2
		}
	}

	for seen := 0; seen < 2; {
		resp, err := stream.Recv()
		if err != nil {
			log.Fatal(err)
		}
		for _, ev := range resp.Events {
			fmt.Println(ev.Type, ev.Revision, ev.Job.GetVersion(), ev.Job.GetState()) // CREATED v1, UPDATED v2
			seen++
		}
	}
}
