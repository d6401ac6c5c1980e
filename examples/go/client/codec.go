package main

import (
	"fmt"

	protov1 "github.com/golang/protobuf/proto"
	protov2 "google.golang.org/protobuf/proto"
)

// codec marshals both generations of Go protobuf messages. The stubs `make proto-go` writes are
// APIv2 (google.golang.org/protobuf, which knows proto3 `optional`), while Debian's grpc-go 1.33
// and its health stubs are built on golang/protobuf 1.3 (APIv1), whose default codec cannot
// unmarshal APIv2 messages. With a module-aware toolchain and current grpc-go this is not needed.
type codec struct{}

func (codec) Name() string { return "proto" }

func (codec) Marshal(v interface{}) ([]byte, error) {
	switch m := v.(type) {
	case protov2.Message:
		return protov2.Marshal(m)
	case protov1.Message:
		return protov1.Marshal(m)
	}
	return nil, fmt.Errorf("codec: %T is not a protobuf message", v)
}

func (codec) Unmarshal(data []byte, v interface{}) error {
	switch m := v.(type) {
	case protov2.Message:
		return protov2.Unmarshal(data, m)
	case protov1.Message:
		return protov1.Unmarshal(data, m)
	}
	return fmt.Errorf("codec: %T is not a protobuf message", v)
}
