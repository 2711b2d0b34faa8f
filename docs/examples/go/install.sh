# One `go install` per module: protoc-gen-go and protoc-gen-go-grpc live in two different modules.
go install google.golang.org/protobuf/cmd/protoc-gen-go@latest
go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@latest
