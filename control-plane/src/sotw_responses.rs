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

use crate::snapshot::Snapshot;

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

/// `type_url`'s response for `names` (all, when empty) from `snapshot`.
pub fn response(snapshot: &Snapshot, type_url: &str, names: &[String]) -> Arc<Encoded> {
    let lock = || {
        snapshot
            .responses
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    };
    if let Some(hit) = lock()
        .iter()
        .find(|e| e.type_url == type_url && e.names == names)
    {
        return hit.clone();
    }
    let resources = snapshot.select(type_url, names);
    let fresh = Arc::new(Encoded {
        type_url: type_url.to_string(),
        names: names.to_vec(),
        digest: digest(&resources),
        body: DiscoveryResponse {
            version_info: snapshot.version_of(type_url).to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The frame is the response prost would encode with the nonce in it.
    #[test]
    fn a_frame_is_the_whole_response_with_its_nonce() {
        let snapshot = Snapshot::default();
        let encoded = response(&snapshot, crate::translate::CLUSTER_TYPE, &[]);
        let frame = encoded.frame("42");
        let decoded = DiscoveryResponse::decode(&frame[5..]).unwrap();
        assert_eq!(decoded.nonce, "42");
        assert_eq!(decoded.type_url, crate::translate::CLUSTER_TYPE);
        assert_eq!(
            u32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize,
            frame.len() - 5
        );
        // Asked again, the same encoding is handed out; a clone of the snapshot keeps none.
        let again = response(&snapshot, crate::translate::CLUSTER_TYPE, &[]);
        assert!(Arc::ptr_eq(&encoded, &again));
        let copy = snapshot.clone();
        assert!(!Arc::ptr_eq(
            &encoded,
            &response(&copy, crate::translate::CLUSTER_TYPE, &[])
        ));
    }
}
