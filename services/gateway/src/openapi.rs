//! `/openapi.json`: an OpenAPI 3.1 document made from the route table and
//! the services' message descriptors, so it says what the handlers do:
//! the same messages, in the same JSON mapping (proto field names, enums
//! by name, 64-bit integers as numbers, defaults included).

use std::collections::BTreeMap;

use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Value, json};

use crate::routes::{Body, ROUTES, path_fields};

fn reference(message: &MessageDescriptor) -> Value {
    json!({ "$ref": format!("#/components/schemas/{}", message.full_name()) })
}

fn scalar(kind: &Kind) -> Value {
    match kind {
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
        Kind::Bool => json!({"type": "boolean"}),
        Kind::Double | Kind::Float => json!({"type": "number"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({"type": "integer", "format": "int32"})
        }
        Kind::Uint32 | Kind::Fixed32 => {
            json!({"type": "integer", "format": "int32", "minimum": 0, "maximum": u32::MAX})
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            json!({"type": "integer", "format": "int64"})
        }
        Kind::Uint64 | Kind::Fixed64 => json!({"type": "integer", "format": "int64", "minimum": 0}),
        Kind::Enum(e) => json!({
            "type": "string",
            "enum": e.values().map(|v| v.name().to_string()).collect::<Vec<_>>(),
        }),
        Kind::Message(m) => reference(m),
    }
}

fn field_schema(field: &FieldDescriptor) -> Value {
    if field.is_map() {
        let Kind::Message(entry) = field.kind() else {
            return json!({"type": "object"});
        };
        let value = entry.map_entry_value_field();
        return json!({"type": "object", "additionalProperties": scalar(&value.kind())});
    }
    let item = scalar(&field.kind());
    if field.is_list() {
        json!({"type": "array", "items": item})
    } else {
        item
    }
}

fn message_schema(message: &MessageDescriptor) -> Value {
    let properties: serde_json::Map<String, Value> = message
        .fields()
        .map(|f| (f.name().to_string(), field_schema(&f)))
        .collect();
    json!({"type": "object", "properties": properties})
}

/// Every message reachable from `root`, by full name.
fn collect(root: &MessageDescriptor, into: &mut BTreeMap<String, Value>) {
    if into.contains_key(root.full_name()) || root.is_map_entry() {
        return;
    }
    into.insert(root.full_name().to_string(), message_schema(root));
    for field in root.fields() {
        if let Kind::Message(m) = field.kind() {
            if m.is_map_entry() {
                if let Kind::Message(v) = m.map_entry_value_field().kind() {
                    collect(&v, into);
                }
            } else {
                collect(&m, into);
            }
        }
    }
}

fn problem_schema() -> Value {
    json!({
        "type": "object",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["field", "reason"],
                    "properties": {"field": {"type": "string"}, "reason": {"type": "string"}}
                }
            }
        }
    })
}

/// The document.
pub fn document(pool: &DescriptorPool) -> Value {
    let mut schemas = BTreeMap::new();
    let mut paths: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
    for route in ROUTES {
        let Some(method) = crate::method_of(pool, route.rpc) else {
            continue;
        };
        let (input, output) = (method.input(), method.output());
        collect(&input, &mut schemas);
        collect(&output, &mut schemas);
        let in_path = path_fields(route.path);
        let mut parameters: Vec<Value> = in_path
            .iter()
            .filter_map(|name| input.get_field_by_name(name))
            .map(|f| {
                json!({"name": f.name(), "in": "path", "required": true, "schema": field_schema(&f)})
            })
            .collect();
        let body_field = match route.body {
            Body::Field(name) => Some(name),
            _ => None,
        };
        if matches!(route.body, Body::None) || body_field.is_some() {
            for field in input.fields() {
                let settable = !field.is_list()
                    && !field.is_map()
                    && !matches!(field.kind(), Kind::Message(_) | Kind::Bytes);
                let implied = route.stream && field.name() == "follow";
                if settable
                    && !implied
                    && !in_path.contains(&field.name())
                    && Some(field.name()) != body_field
                {
                    parameters.push(json!({
                        "name": field.name(), "in": "query", "required": false,
                        "schema": field_schema(&field),
                    }));
                }
            }
        }
        let mut operation = json!({
            "operationId": route.rpc.replace(['.', '/'], "_")
                + if route.stream { "_stream" } else { "" },
            "summary": route.summary,
            "parameters": parameters,
            "responses": {
                "default": {
                    "description": "A problem (RFC 9457): the status, why, and the fields at fault",
                    "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
                }
            }
        });
        let ok = if route.stream {
            json!({
                "description": format!("Server-Sent Events: each `data:` is a {} as JSON; an `error` event carries a problem; `end` closes", output.full_name()),
                "content": {"text/event-stream": {"schema": {"type": "string"}}}
            })
        } else if method.is_server_streaming() {
            json!({
                "description": format!("Every {}, as an array", output.full_name()),
                "content": {"application/json": {"schema": {"type": "array", "items": reference(&output)}}}
            })
        } else {
            json!({
                "description": output.full_name(),
                "content": {"application/json": {"schema": reference(&output)}}
            })
        };
        operation["responses"]["200"] = ok;
        let body_schema = match route.body {
            Body::None => None,
            Body::Whole => Some(reference(&input)),
            Body::Field(name) => input.get_field_by_name(name).map(|f| field_schema(&f)),
        };
        if let Some(schema) = body_schema {
            let mut content = json!({"application/json": {"schema": schema}});
            if body_field == Some("spec") {
                content["application/toml"] = json!({"schema": {"type": "string"}});
            }
            operation["requestBody"] = json!({"required": true, "content": content});
        }
        paths
            .entry(route.path.to_string())
            .or_default()
            .insert(route.method.as_str().to_lowercase(), operation);
    }
    let mut components: serde_json::Map<String, Value> = schemas.into_iter().collect();
    components.insert("Problem".into(), problem_schema());
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Capstan API",
            "version": "v1",
            "description": "REST over Capstan's gRPC services: each operation is the gRPC method its operationId names, with the same messages in the proto3 JSON mapping and the same authorisation."
        },
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "An API key or a token from auth"}},
            "schemas": components,
        },
        "paths": paths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_has_every_route_and_every_reference_resolves() {
        let document = document(&crate::descriptors());
        assert_eq!(document["openapi"], "3.1.0");
        let operations: usize = document["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| p.as_object().unwrap().len())
            .sum();
        assert_eq!(operations, ROUTES.len());
        let text = document.to_string();
        let schemas = document["components"]["schemas"].as_object().unwrap();
        for reference in text.split("\"#/components/schemas/").skip(1) {
            let name = &reference[..reference.find('"').unwrap()];
            assert!(
                schemas.contains_key(name),
                "{name} is referenced, not defined"
            );
        }
        let get_app = &document["paths"]["/v1/apps/{name}"]["get"];
        assert_eq!(get_app["parameters"][0]["name"], "name");
        assert_eq!(
            get_app["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/capstan.v1.AppStatus"
        );
    }
}
