//! The local `EdgeInference` API over real gRPC on 127.0.0.1:0 against a served narrow
//! ResNet-20 supernet (widths 4/8/16): answers equal the in-process forward pass, bad input
//! is INVALID_ARGUMENT naming the field, and switches under in-flight requests never mix
//! subnets.
use std::collections::HashMap;
use std::sync::Arc;

use adaptivenet_core::artifact::{write_artifact, InputSpec};
use adaptivenet_core::model::{ArchDescriptor, Model};
use adaptivenet_core::supernet::{branches::build_supernet, Subnet, Supernet, SupernetConfig};
use adaptivenet_edge::serve::grpc::{serve, ApiConfig, InferenceService};
use adaptivenet_edge::serve::{ArtifactSource, Server};
use adaptivenet_proto::v1 as pb;
use adaptivenet_proto::v1::edge_inference_client::EdgeInferenceClient;
use candle_core::{Device, Tensor};
use tonic::transport::Channel;

fn supernet() -> Supernet {
    let arch = ArchDescriptor::from_json(
        br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[3,3,3],"widths":[4,8,16],"in_channels":1,"num_classes":10}"#,
    )
    .unwrap();
    let oracle = Model::init(&arch.spec, 11).unwrap();
    build_supernet(&oracle, &SupernetConfig::merge_only()).unwrap()
}

fn artifact(sn: &Supernet) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let input = InputSpec {
        shape: [1, 28, 28],
        mean: vec![0.25],
        std: vec![0.5],
        class_names: (0..10).map(|i| format!("c{i}")).collect(),
    };
    write_artifact(dir.path(), sn, input, &"0".repeat(64), vec![]).unwrap();
    dir
}

struct Fixture {
    _dir: tempfile::TempDir,
    server: Arc<Server>,
    folded: Supernet,
    client: EdgeInferenceClient<Channel>,
    api: adaptivenet_edge::serve::grpc::ApiHandle,
}

async fn start(first: &Subnet, max_batch: usize) -> Fixture {
    let cfg = ApiConfig {
        max_batch,
        max_concurrent: 64,
        token: None,
    };
    start_with(first, cfg).await.0
}

/// The fixture plus a clone of its service (sharing its slots).
async fn start_with(first: &Subnet, cfg: ApiConfig) -> (Fixture, InferenceService) {
    let sn = supernet();
    let dir = artifact(&sn);
    let src = ArtifactSource::open(dir.path()).unwrap();
    let server = Arc::new(Server::start(src, first, 50).unwrap());
    let svc = InferenceService::new(server.clone(), cfg, 3.5);
    let api = serve("127.0.0.1:0", svc.clone()).await.unwrap();
    let client = EdgeInferenceClient::connect(format!("http://{}", api.addr))
        .await
        .unwrap();
    let mut folded = sn;
    folded.fold().unwrap();
    (
        Fixture {
            _dir: dir,
            server,
            folded,
            client,
            api,
        },
        svc,
    )
}

fn tensor_req(shape: Vec<u32>, data: Vec<f32>) -> pb::InferRequest {
    pb::InferRequest {
        images: Some(pb::infer_request::Images::Tensor(pb::FloatTensor {
            shape,
            data,
        })),
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_equals_the_in_process_forward_pass_and_bad_input_names_the_field() {
    let a = Subnet::parse("1x0000000").unwrap();
    let mut f = start(&a, 8).await;
    let x = Tensor::randn(0f32, 1.0, (3, 1, 28, 28), &Device::Cpu).unwrap();
    let r = f
        .client
        .infer(tensor_req(vec![3, 1, 28, 28], flat(&x)))
        .await
        .unwrap()
        .into_inner();
    let want = f.folded.forward(&a, &x).unwrap();
    assert_eq!((r.batch, r.num_classes), (3, 10));
    assert_eq!(r.scores, flat(&want));
    assert_eq!(r.subnet, "1x0000000");
    assert_eq!(r.top1, adaptivenet_edge::quality::top1(&want).unwrap());
    assert!(r.latency_ms > 0.0);

    // Raw 8-bit pixels are normalised with the artifact's mean/std, like local data.
    let pixels: Vec<u8> = (0..2 * 28 * 28).map(|i| (i * 37 % 256) as u8).collect();
    let r = f
        .client
        .infer(pb::InferRequest {
            images: Some(pb::infer_request::Images::Raw(pb::RawImages {
                shape: vec![2, 1, 28, 28],
                pixels: pixels.clone(),
            })),
        })
        .await
        .unwrap()
        .into_inner();
    let norm: Vec<f32> = pixels
        .iter()
        .map(|&v| (f32::from(v) / 255.0 - 0.25) / 0.5)
        .collect();
    let xr = Tensor::from_vec(norm, (2, 1, 28, 28), &Device::Cpu).unwrap();
    assert_eq!(r.scores, flat(&f.folded.forward(&a, &xr).unwrap()));

    // Served requests feed the latency window the controller reads.
    let st = f
        .client
        .status(pb::AgentStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.window_samples, 2);
    assert_eq!((st.requests_served, st.images_served), (2, 5));
    assert_eq!(st.subnet, "1x0000000");
    assert_eq!(st.input_shape, vec![1, 28, 28]);
    assert_eq!((st.max_batch, st.budget_ms), (8, 3.5));
    assert!(st.latency_p50_ms > 0.0 && st.latency_p95_ms >= st.latency_p50_ms);
    assert_eq!(f.server.window_stats().0, 2);

    let one = flat(&x)[..784].to_vec();
    let cases: Vec<(pb::InferRequest, &str)> = vec![
        (pb::InferRequest { images: None }, "images"),
        (
            tensor_req(vec![1, 28, 28], one.clone()),
            "images.tensor.shape",
        ),
        (
            tensor_req(vec![1, 3, 28, 28], one.clone()),
            "images.tensor.shape",
        ),
        (tensor_req(vec![0, 1, 28, 28], vec![]), "empty batch"),
        (
            tensor_req(vec![9, 1, 28, 28], vec![]),
            "exceeds the maximum of 8",
        ),
        (
            tensor_req(vec![2, 1, 28, 28], one.clone()),
            "images.tensor.data",
        ),
        (
            tensor_req(vec![1, 1, 28, 28], {
                let mut v = one.clone();
                v[5] = f32::NAN;
                v
            }),
            "value 5 is not finite",
        ),
        (
            pb::InferRequest {
                images: Some(pb::infer_request::Images::Raw(pb::RawImages {
                    shape: vec![1, 1, 28, 28],
                    pixels: vec![0; 10],
                })),
            },
            "images.raw.pixels",
        ),
    ];
    for (req, field) in cases {
        let e = f.client.infer(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    // Nothing bad was served or recorded.
    assert_eq!(f.server.served(), (2, 5));
    assert_eq!(f.server.window_stats().0, 2);
    f.api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switches_during_in_flight_requests_never_mix_subnets() {
    let subnets: Vec<Subnet> = ["000000000", "1x0000000", "1x1x00000", "2xx000000"]
        .iter()
        .map(|s| Subnet::parse(s).unwrap())
        .collect();
    let f = start(&subnets[0], 8).await;
    let x = Tensor::randn(0f32, 1.0, (2, 1, 28, 28), &Device::Cpu).unwrap();
    let want: HashMap<String, Vec<f32>> = subnets
        .iter()
        .map(|s| (s.to_string(), flat(&f.folded.forward(s, &x).unwrap())))
        .collect();
    // Distinct answers, so an answer identifies its subnet.
    for (i, a) in subnets.iter().enumerate() {
        for b in &subnets[i + 1..] {
            assert_ne!(want[&a.to_string()], want[&b.to_string()]);
        }
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let switcher = {
        let (server, subnets, stop) = (f.server.clone(), subnets.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            let mut k = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                k += 1;
                server.switch(&subnets[k % subnets.len()]).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            k
        })
    };
    let data = flat(&x);
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let mut c = f.client.clone();
            let data = data.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for _ in 0..25 {
                    let r = c
                        .infer(tensor_req(vec![2, 1, 28, 28], data.clone()))
                        .await
                        .expect("every request succeeds during switches")
                        .into_inner();
                    out.push((r.subnet, r.model_version, r.scores));
                }
                out
            })
        })
        .collect();
    let mut answers = Vec::new();
    for c in clients {
        answers.extend(c.await.unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let switches = switcher.await.unwrap();
    assert!(switches > 3, "only {switches} switches happened");
    let mut version_subnet: HashMap<u64, String> = HashMap::new();
    for (subnet, version, scores) in &answers {
        assert_eq!(
            &want[subnet], scores,
            "answer of {subnet} is not that subnet's"
        );
        let prev = version_subnet
            .entry(*version)
            .or_insert_with(|| subnet.clone());
        assert_eq!(
            prev, subnet,
            "model version {version} answered as two subnets"
        );
    }
    let distinct: std::collections::HashSet<&String> = answers.iter().map(|a| &a.0).collect();
    assert!(distinct.len() >= 2, "all 100 answers came from one subnet");
    assert_eq!(answers.len(), 100);
    f.api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_and_concurrency_limit_guard_the_local_api() {
    let a = Subnet::parse("1x0000000").unwrap();
    let cfg = ApiConfig {
        max_batch: 8,
        max_concurrent: 2,
        token: Some("s3cret-token".into()),
    };
    let (mut f, svc) = start_with(&a, cfg).await;
    let x = Tensor::randn(0f32, 1.0, (1, 1, 28, 28), &Device::Cpu).unwrap();
    let req = |token: Option<&str>| {
        let mut r = tonic::Request::new(tensor_req(vec![1, 1, 28, 28], flat(&x)));
        if let Some(t) = token {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        r
    };
    // Without the token, or with a wrong one: UNAUTHENTICATED, for Infer and Status alike.
    for token in [None, Some("s3cret-tokem"), Some("s3cret")] {
        let e = f.client.infer(req(token)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{token:?}: {e:?}");
    }
    let e = f
        .client
        .status(pb::AgentStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert_eq!(f.server.served().0, 0, "no refused call was served");
    let r = f.client.infer(req(Some("s3cret-token"))).await.unwrap();
    assert_eq!(r.into_inner().batch, 1);

    // Both slots taken (as two inferences in flight would hold them): the next call is
    // refused at once with RESOURCE_EXHAUSTED instead of queueing; a freed slot serves again.
    let held: Vec<_> = (0..2).map(|_| svc.try_slot().unwrap()).collect();
    let e = f.client.infer(req(Some("s3cret-token"))).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("busy"), "{e:?}");
    drop(held);
    f.client.infer(req(Some("s3cret-token"))).await.unwrap();
    assert_eq!(f.server.served().0, 2);
    f.api.shutdown().await;
}

#[test]
fn a_listener_beyond_loopback_is_warned_about() {
    use adaptivenet_edge::serve::grpc::exposure_warning;
    let lo: std::net::SocketAddr = "127.0.0.1:50061".parse().unwrap();
    let lo6: std::net::SocketAddr = "[::1]:50061".parse().unwrap();
    let any: std::net::SocketAddr = "0.0.0.0:50061".parse().unwrap();
    assert_eq!(exposure_warning(&lo, false), None);
    assert_eq!(exposure_warning(&lo6, false), None);
    let w = exposure_warning(&any, false).unwrap();
    assert!(
        w.contains("not loopback") && w.contains("--listen-token-file"),
        "{w}"
    );
    assert!(exposure_warning(&any, true)
        .unwrap()
        .contains("bearer token"));
}
