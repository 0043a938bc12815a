//! A gateway's `/metrics` read from outside, as the benches and load runs count a replica's
//! upstream calls: one scrape, and a metric summed over its series.

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

/// The Prometheus text of the admin listener at `admin` (`host:port`); empty when it does
/// not answer, so a gateway that is down reads as all zeros.
pub async fn scrape(http: &Client<HttpConnector, Full<Bytes>>, admin: &str) -> String {
    let req = Request::builder()
        .uri(format!("http://{admin}/metrics"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    match http.request(req).await {
        Ok(resp) => resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The sum of every series of the metric `name` (all label sets) in `text`.
pub fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sums_every_series_of_one_metric_only() {
        let text = "# TYPE cxgate_upstream_requests_total counter\n\
                    cxgate_upstream_requests_total{route=\"GET /me\"} 3\n\
                    cxgate_upstream_requests_total{route=\"other\"} 4\n\
                    cxgate_upstream_requests_total_extra 100\n";
        assert_eq!(super::sum(text, "cxgate_upstream_requests_total"), 7.0);
        assert_eq!(super::sum(text, "cxgate_missing"), 0.0);
    }
}
