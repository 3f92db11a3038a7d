use super::*;

#[tokio::test]
async fn members_join_leave_and_overflow() {
    let spec = ListenSpec {
        kind: GroupKind::Dp,
        addr: "127.0.0.1".into(),
        port: 0,
        needed: 2,
        size: 3,
    };
    let (master, listener) = Master::bind(spec).await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel();
    tokio::spawn(master.clone().serve(listener, fatal_tx));
    assert!(!master.ready());

    let join_spec = |ranks, first| JoinSpec {
        kind: GroupKind::Dp,
        addr: "127.0.0.1".into(),
        port,
        size: 3,
        ranks,
        first,
        deadline: Duration::from_secs(5),
    };
    let link = Arc::new(Link::default());
    let member = tokio::spawn(join(join_spec(2, 1), link.clone()));
    tokio::time::timeout(Duration::from_secs(5), master.wait_ready())
        .await
        .expect("ready");

    // A third rank does not fit.
    let extra = join(join_spec(1, 3), Arc::new(Link::default())).await;
    assert_eq!(extra, 1);

    // The master's goodbye ends the member with 0.
    master.goodbye().await;
    let code = tokio::time::timeout(Duration::from_secs(5), member)
        .await
        .expect("member ends")
        .expect("no panic");
    assert_eq!(code, 0);
    // Once the member's socket closes, the master's reader sees a drop without goodbye,
    // which a real master, already exiting, would not live to see; here it shows.
    drop(link);
    let fatal = tokio::time::timeout(Duration::from_secs(5), fatal_rx.recv()).await;
    assert!(matches!(fatal, Ok(Some(m)) if m.contains("without a goodbye")));
}

#[tokio::test]
async fn a_member_gives_up_at_its_deadline() {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = probe.local_addr().expect("addr").port();
    drop(probe);
    let spec = JoinSpec {
        kind: GroupKind::Node,
        addr: "127.0.0.1".into(),
        port,
        size: 2,
        ranks: 1,
        first: 1,
        deadline: Duration::from_millis(300),
    };
    assert_eq!(join(spec, Arc::new(Link::default())).await, 1);
}

#[test]
fn hello_lines() {
    let h = parse_hello("HELLO kind=dp size=4 ranks=2 first=2").expect("valid");
    assert_eq!((h.kind.as_str(), h.size, h.ranks, h.first), ("dp", 4, 2, 2));
    assert!(parse_hello("HI").is_err());
    assert!(parse_hello("HELLO kind=dp size=x ranks=1 first=0").is_err());
}
