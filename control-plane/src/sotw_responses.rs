//! A snapshot's state-of-the-world responses, encoded once for every stream that gets them.
//!
//! The replicas of a service share one view (`ads_stream::SharedViews`) and ask it for the
//! same types and names, so their pushes differ only in the nonce. Each distinct response is
//! selected, hashed and encoded once per snapshot; a stream's push copies it and appends its
//! nonce, the response's last field.

use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

/// `DiscoveryResponse.nonce`'s field number.
const NONCE_FIELD: u32 = 5;

/// The responses one snapshot has encoded, at most `MAX_KEPT`; past that, a response is
/// encoded for its stream alone. A clone starts empty: a snapshot is cloned only to be
/// changed, and the copy must not answer with what the original held.
#[derive(Default)]
pub struct Responses(Mutex<Vec<Arc<Encoded>>>);

const MAX_KEPT: usize = 64;

impl Clone for Responses {
    fn clone(&self) -> Self {
        Responses::default()
    }
}

impl std::fmt::Debug for Responses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = self.0.lock().map_or(0, |r| r.len());
        write!(f, "Responses({kept} kept)")
    }
}

/// One type's response for one list of names, without its nonce.
pub struct Encoded {
    type_url: String,
    names: Vec<String>,
    /// Of the resources: a subscriber that holds the same set is sent nothing.
    pub digest: u64,
    /// The response's fields but the nonce, encoded.
    body: Bytes,
}

impl Encoded {
    /// The response as one gRPC message, with `nonce`.
    pub fn frame(&self, nonce: &str) -> Bytes {
        use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
        let nonce_len = key_len(NONCE_FIELD) + encoded_len_varint(nonce.len() as u64) + nonce.len();
        let len = self.body.len() + nonce_len;
        let mut buf = BytesMut::with_capacity(5 + len);
        buf.put_u8(0);
        buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        buf.put_slice(&self.body);
        encode_key(NONCE_FIELD, WireType::LengthDelimited, &mut buf);
        encode_varint(nonce.len() as u64, &mut buf);
        buf.put_slice(nonce.as_bytes());
        buf.freeze()
    }
}

fn digest(resources: &[Any]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    for r in resources {
        r.type_url.hash(&mut h);
        r.value.hash(&mut h);
    }
    h.finish()
}

impl Responses {
    /// `type_url`'s response at `version` for `names` (all, when empty), encoded from what
    /// `select` gives if it has not been yet.
    pub fn get_or_encode(
        &self,
        type_url: &str,
        names: &[String],
        version: u64,
        select: impl FnOnce() -> Vec<Any>,
    ) -> Arc<Encoded> {
        let lock = || self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hit) = lock()
            .iter()
            .find(|e| e.type_url == type_url && e.names == names)
        {
            return hit.clone();
        }
        let resources = select();
        let fresh = Arc::new(Encoded {
            type_url: type_url.to_string(),
            names: names.to_vec(),
            digest: digest(&resources),
            body: DiscoveryResponse {
                version_info: version.to_string(),
                resources,
                type_url: type_url.to_string(),
                ..Default::default()
            }
            .encode_to_vec()
            .into(),
        });
        let mut kept = lock();
        if kept.len() < MAX_KEPT {
            kept.push(fresh.clone());
        }
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

    fn one_cluster() -> Vec<Any> {
        vec![Any {
            type_url: CDS.into(),
            value: vec![10, 1, b'a'],
        }]
    }

    /// The frame is the response prost would encode with the nonce in it.
    #[test]
    fn a_frame_is_the_whole_response_with_its_nonce() {
        let kept = Responses::default();
        let encoded = kept.get_or_encode(CDS, &[], 7, one_cluster);
        let frame = encoded.frame("42");
        let decoded = DiscoveryResponse::decode(&frame[5..]).unwrap();
        assert_eq!(
            (
                decoded.version_info.as_str(),
                decoded.type_url.as_str(),
                decoded.nonce.as_str()
            ),
            ("7", CDS, "42")
        );
        assert_eq!(decoded.resources, one_cluster());
        assert_eq!(
            u32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize,
            frame.len() - 5
        );
    }

    /// Asked again, the same encoding is handed out without selecting; other names get their
    /// own; a clone keeps none.
    #[test]
    fn each_response_is_encoded_once_and_a_clone_starts_empty() {
        let kept = Responses::default();
        let first = kept.get_or_encode(CDS, &[], 7, one_cluster);
        let again = kept.get_or_encode(CDS, &[], 7, || unreachable!("encoded already"));
        assert!(Arc::ptr_eq(&first, &again));
        let named = kept.get_or_encode(CDS, &["a".to_string()], 7, one_cluster);
        assert!(!Arc::ptr_eq(&first, &named));
        let copy = kept.clone();
        let fresh = copy.get_or_encode(CDS, &[], 7, one_cluster);
        assert!(!Arc::ptr_eq(&first, &fresh));
    }
}
