// A Go client of one xylen model server: health, GetModelInfo, and a Predict of the feature
// rows given on the command line (each a comma-separated vector in GetModelInfo's
// feature_names order; none: one all-zero row).
//
//	make proto-go   # Go stubs of protos/xylen/v1 into run/go (GOPATH layout)
//	GOPATH=$PWD/run/go:/usr/share/gocode GO111MODULE=off go build -o run/go/bin/xylen-client ./examples/go/client
//	run/go/bin/xylen-client -addr 127.0.0.1:8001 -- 0.001,0.002,...   # "--": rows may start with "-"
//
// It prints one line per row: "<model> v<version> p_up=<probability> <SIGNAL> <prediction id>".
// Errors are printed with their gRPC status code and message, and the exit code is 1.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	xylenv1 "github.com/xylen-dev/xylen/gen/go/xylen/v1"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

func fail(what string, err error) {
	if s, ok := status.FromError(err); ok {
		fmt.Fprintf(os.Stderr, "xylen-client: %s: %s %s\n", what, s.Code(), s.Message())
	} else {
		fmt.Fprintf(os.Stderr, "xylen-client: %s: %v\n", what, err)
	}
	os.Exit(1)
}

func parseRow(text string) ([]float64, error) {
	var values []float64
	for _, field := range strings.Split(text, ",") {
		v, err := strconv.ParseFloat(strings.TrimSpace(field), 64)
		if err != nil {
			return nil, fmt.Errorf("feature %d: %v", len(values), err)
		}
		values = append(values, v)
	}
	return values, nil
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8001", "host:port of a xylen model server (plaintext)")
	timeout := flag.Duration("timeout", 10*time.Second, "deadline of each call")
	flag.Parse()

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	conn, err := grpc.DialContext(ctx, *addr, grpc.WithInsecure(), grpc.WithBlock(),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(codec{})))
	if err != nil {
		fail("dial "+*addr, err)
	}
	defer conn.Close()

	health, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		fail("health", err)
	}
	if health.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		fmt.Fprintf(os.Stderr, "xylen-client: %s is %s\n", *addr, health.GetStatus())
		os.Exit(1)
	}

	client := xylenv1.NewModelServiceClient(conn)
	info, err := client.GetModelInfo(ctx, &xylenv1.GetModelInfoRequest{})
	if err != nil {
		fail("GetModelInfo", err)
	}
	model := info.GetModelInfo()
	fmt.Printf("model %s v%d, %d features, lookback %d\n",
		model.GetName(), model.GetVersion(), len(model.GetFeatureNames()), model.GetLookback())

	request := &xylenv1.PredictRequest{}
	rows := flag.Args()
	if len(rows) == 0 {
		rows = []string{strings.TrimSuffix(strings.Repeat("0,", len(model.GetFeatureNames())), ",")}
	}
	for _, text := range rows {
		values, err := parseRow(text)
		if err != nil {
			fmt.Fprintf(os.Stderr, "xylen-client: %v\n", err)
			os.Exit(2)
		}
		request.Inputs = append(request.Inputs, &xylenv1.PredictInput{
			Input: &xylenv1.PredictInput_Features{Features: &xylenv1.FeatureVector{Values: values}},
		})
	}
	response, err := client.Predict(ctx, request)
	if err != nil {
		fail("Predict", err)
	}
	for _, p := range response.GetPredictions() {
		signal := strings.TrimPrefix(p.GetSignal().String(), "SIGNAL_")
		fmt.Printf("%s v%d p_up=%.6f %s %s\n", p.GetModelName(), p.GetModelVersion(),
			p.GetProbabilityUp(), signal, p.GetPredictionId())
	}
}
