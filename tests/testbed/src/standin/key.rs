//! The agent's RSA key: generation, the official `.credentials_rsaparams` file format (the JSON of .NET
//! `RSAParameters` written by the agent's `RSAFileKeyManager`), and the RS256 client assertion the listener
//! signs to get an OAuth token.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeyPairComponents, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::RSA_PKCS1_SHA256;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

use super::StandinError;

/// The private key parameters, as the official agent writes them to `.credentials_rsaparams`:
/// big-endian byte arrays, base64 (standard alphabet, padded), the field names of .NET `RSAParameters`
/// serialized through `RSAParametersSerializable.GetObjectData`: `ContainerName`, then `d`, `dp`, `dq`,
/// `exponent`, `inverseQ`, `modulus`, `p`, `q`. Its reader takes `ContainerName` as optional and ignores
/// any other name (older agents wrote more), and so does this one.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RsaParams {
    #[serde(rename = "ContainerName", default)]
    pub container_name: String,
    #[serde(with = "b64")]
    pub d: Vec<u8>,
    #[serde(with = "b64")]
    pub dp: Vec<u8>,
    #[serde(with = "b64")]
    pub dq: Vec<u8>,
    #[serde(with = "b64")]
    pub exponent: Vec<u8>,
    #[serde(rename = "inverseQ", with = "b64")]
    pub inverse_q: Vec<u8>,
    #[serde(with = "b64")]
    pub modulus: Vec<u8>,
    #[serde(with = "b64")]
    pub p: Vec<u8>,
    #[serde(with = "b64")]
    pub q: Vec<u8>,
}

impl std::fmt::Debug for RsaParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print private key material.
        f.debug_struct("RsaParams")
            .field("modulus_bits", &(self.modulus.len() * 8))
            .finish_non_exhaustive()
    }
}

mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

impl RsaParams {
    /// A fresh 2048-bit key, as `RSAFileKeyManager.CreateKey` makes one.
    pub fn generate() -> Result<Self, StandinError> {
        let pair = KeyPair::generate(KeySize::Rsa2048)
            .map_err(|_| StandinError::Key("RSA key generation failed".into()))?;
        let pkcs8 = aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair)
            .map_err(|_| StandinError::Key("cannot export the generated RSA key".into()))?;
        Self::from_pkcs8(pkcs8.as_ref())
    }

    /// Extracts the parameters from a PKCS#8 `PrivateKeyInfo` holding a PKCS#1 `RSAPrivateKey`.
    fn from_pkcs8(der: &[u8]) -> Result<Self, StandinError> {
        let bad = |what: &str| StandinError::Key(format!("malformed PKCS#8 RSA key: {what}"));
        let mut outer = Der::new(der)
            .sequence()
            .ok_or_else(|| bad("outer sequence"))?;
        outer.integer().ok_or_else(|| bad("version"))?;
        outer.sequence().ok_or_else(|| bad("algorithm"))?;
        let inner = outer.octet_string().ok_or_else(|| bad("private key"))?;
        let mut rsa = Der::new(inner)
            .sequence()
            .ok_or_else(|| bad("RSAPrivateKey"))?;
        rsa.integer().ok_or_else(|| bad("RSAPrivateKey version"))?;
        let mut next = |name: &str| {
            rsa.integer()
                .map(|v| strip_leading_zeros(v).to_vec())
                .ok_or_else(|| bad(name))
        };
        let modulus = next("modulus")?;
        let exponent = next("publicExponent")?;
        let d = next("privateExponent")?;
        let p = next("prime1")?;
        let q = next("prime2")?;
        let dp = next("exponent1")?;
        let dq = next("exponent2")?;
        let inverse_q = next("coefficient")?;
        Ok(Self {
            container_name: String::new(),
            d,
            dp,
            dq,
            exponent,
            inverse_q,
            modulus,
            p,
            q,
        })
    }

    /// The key pair for signing; fails when the parameters are inconsistent.
    pub fn key_pair(&self) -> Result<KeyPair, StandinError> {
        let components = KeyPairComponents {
            public_key: PublicKeyComponents {
                n: strip_leading_zeros(&self.modulus),
                e: strip_leading_zeros(&self.exponent),
            },
            d: self.d.as_slice(),
            p: self.p.as_slice(),
            q: self.q.as_slice(),
            dP: self.dp.as_slice(),
            dQ: self.dq.as_slice(),
            qInv: self.inverse_q.as_slice(),
        };
        KeyPair::from_components(&components).map_err(|e| {
            StandinError::Key(format!(
                "the RSA parameters in .credentials_rsaparams do not form a valid key ({e}); \
                 run config.sh again to make a new one"
            ))
        })
    }

    /// The public key as `TaskAgentPublicKey` sends it: `exponent` and `modulus`, base64 big-endian.
    pub fn public_key_json(&self) -> serde_json::Value {
        serde_json::json!({
            "exponent": STANDARD.encode(&self.exponent),
            "modulus": STANDARD.encode(&self.modulus),
        })
    }
}

fn strip_leading_zeros(v: &[u8]) -> &[u8] {
    let first = v.iter().position(|b| *b != 0).unwrap_or(v.len());
    &v[first..]
}

/// A JWT client assertion (RS256) for the OAuth `client_credentials` grant with
/// `client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`:
/// `iss` = `sub` = client id, `aud` = authorization URL, a 5-minute lifetime and a unique `jti`.
pub fn client_assertion(
    key: &KeyPair,
    client_id: &str,
    authorization_url: &str,
    now_unix: i64,
) -> Result<String, StandinError> {
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
    let claims = serde_json::json!({
        "iss": client_id,
        "sub": client_id,
        "aud": authorization_url,
        "nbf": now_unix - 30,
        "iat": now_unix,
        "exp": now_unix + 300,
        "jti": uuid::Uuid::new_v4().to_string(),
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut signature = vec![0u8; key.public_modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        signing_input.as_bytes(),
        &mut signature,
    )
    .map_err(|_| StandinError::Key("signing the client assertion failed".into()))?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

/// A minimal DER reader: just enough to walk PKCS#8 / PKCS#1 RSA keys.
struct Der<'a> {
    rest: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(rest: &'a [u8]) -> Self {
        Self { rest }
    }

    fn element(&mut self, tag: u8) -> Option<&'a [u8]> {
        let (&t, rest) = self.rest.split_first()?;
        if t != tag {
            return None;
        }
        let (&first, mut rest) = rest.split_first()?;
        let len = if first & 0x80 == 0 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            rest = &rest[n..];
            len
        };
        if rest.len() < len {
            return None;
        }
        let (value, rest) = rest.split_at(len);
        self.rest = rest;
        Some(value)
    }

    fn sequence(&mut self) -> Option<Der<'a>> {
        self.element(0x30).map(Der::new)
    }

    fn integer(&mut self) -> Option<&'a [u8]> {
        self.element(0x02)
    }

    fn octet_string(&mut self) -> Option<&'a [u8]> {
        self.element(0x04)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};

    fn public_key_der(params: &RsaParams) -> Vec<u8> {
        // Verify through the public components only, as the simulator does with the registered key.
        let pk = aws_lc_rs::rsa::PublicKeyComponents {
            n: params.modulus.as_slice(),
            e: params.exponent.as_slice(),
        };
        aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(&pk)
            .expect("public key DER")
            .as_ref()
            .to_vec()
    }

    #[test]
    fn generated_key_round_trips_through_the_official_json_and_signs_verifiable_assertions() {
        let params = RsaParams::generate().expect("generate");
        assert_eq!(params.modulus.len(), 256, "2048-bit modulus");
        assert_eq!(params.exponent, vec![1, 0, 1]);

        let json = serde_json::to_value(&params).expect("serialize");
        let names: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(names.len(), 9, "exactly the agent's fields: {names:?}");
        for field in [
            "ContainerName",
            "d",
            "dp",
            "dq",
            "exponent",
            "inverseQ",
            "modulus",
            "p",
            "q",
        ] {
            assert!(json.get(field).is_some(), "missing {field} in {json}");
        }
        assert_eq!(json["exponent"], "AQAB");
        let back: RsaParams = serde_json::from_value(json).expect("deserialize");
        assert!(back == params);

        let pair = back.key_pair().expect("key pair");
        let jwt = client_assertion(&pair, "client-1", "https://sim/token", 1_700_000_000)
            .expect("assertion");
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
        assert_eq!(claims["iss"], "client-1");
        assert_eq!(claims["sub"], "client-1");
        assert_eq!(claims["aud"], "https://sim/token");
        assert!(claims["exp"].as_i64() > claims["nbf"].as_i64());
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).expect("sig");
        let signed = format!("{}.{}", parts[0], parts[1]);
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public_key_der(&params))
            .verify(signed.as_bytes(), &sig)
            .expect("signature verifies with the public key");
    }

    #[test]
    fn a_key_file_without_container_name_or_with_extra_names_loads_as_the_agent_reads_it() {
        let params = RsaParams::generate().expect("generate");
        let mut json = serde_json::to_value(&params).expect("serialize");
        let object = json.as_object_mut().unwrap();
        object.remove("ContainerName");
        object.insert("UseCng".into(), serde_json::Value::Bool(false));
        let back: RsaParams = serde_json::from_value(json).expect("deserialize");
        assert!(back == params);
    }

    #[test]
    fn tampered_parameters_are_rejected_with_a_fix() {
        let mut params = RsaParams::generate().expect("generate");
        params.d[10] ^= 0xff;
        let err = params.key_pair().expect_err("inconsistent key");
        assert!(err.to_string().contains("config.sh"), "{err}");
    }

    #[test]
    fn debug_output_hides_private_material() {
        let params = RsaParams::generate().expect("generate");
        let text = format!("{params:?}");
        assert!(!text.contains(&STANDARD.encode(&params.d)));
        assert!(text.contains("2048"));
    }
}
